"""One chunk of 32 int2 / int3 codes for the Numba matmul, as LLVM vector IR.

LLVM does not vectorise the plain loop over codes packed 4 or 8/3 per byte (an int2 GEMV at
4096 x 4096 took 2.9 ms, int3 4.6 ms, where int4 takes 0.7): each code came from its own
scalar byte load and shift. The intrinsic here loads the chunk's 8 (12) bytes once, spreads them
over 32 lanes with one shuffle and shifts each lane by its own amount (vpsrlvd on x86):

    int2  lane 8t + j holds element 4j + t (bits 2t of byte j)
    int3  lane 4t + g holds element 8g + t (bits 3t of the 24-bit group g = bytes 3g..3g+2)

so x must come in that lane order (the matmul permutes each full chunk once per call). The float
operations are the plain loop's, per lane: ``w = f32(c - zero) * scale``, then ``acc += w * x``,
no contraction; generic LLVM IR, so every target gets it (as SIMD where it has it).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V32I32, _V32F = ir.VectorType(_I32, 32), ir.VectorType(_F32, 32)

# per bits: (bytes per chunk, source lane of each of the 32 lanes, shift of each lane)
_LAYOUT = {
    2: (8, [L % 8 for L in range(32)], [2 * (L // 8) for L in range(32)]),
    3: (12, [L % 4 for L in range(32)], [3 * (L // 4) for L in range(32)]),
}


def _make(bits: int):
    nbytes, src, shift = _LAYOUT[bits]

    @intrinsic
    def intq_block(typingctx, q, r, qo, zero, scale, x, m, k0, acc, am):
        for a, dt, nd in ((q, types.uint8, 2), (x, types.float32, 2), (acc, types.float32, 2)):
            if not (isinstance(a, types.Array) and a.dtype == dt and a.ndim == nd and a.layout == "C"):
                raise TypingError(f"intq_block: expected a C-contiguous {nd}-d {dt} array, got {a}")
        sig = types.void(q, r, qo, zero, scale, x, m, k0, acc, am)

        def codegen(context, builder, signature, args):
            qa, rr, qoff, zr, sc, xa, mm, kk, aa, ai = args
            ty = signature.args
            rr, qoff, mm, kk, ai = (context.cast(builder, v, t, types.int64)
                                    for v, t in ((rr, ty[1]), (qoff, ty[2]), (mm, ty[6]), (kk, ty[7]), (ai, ty[9])))
            zr = context.cast(builder, zr, ty[3], types.int32)
            sc = context.cast(builder, sc, ty[4], types.float32)

            def ptr(arr, aty, idx):
                a = context.make_array(aty)(context, builder, arr)
                shape, strides = cgutils.unpack_tuple(builder, a.shape), cgutils.unpack_tuple(builder, a.strides)
                return cgutils.get_item_pointer2(context, builder, a.data, shape, strides, "C", idx)

            vb = ir.VectorType(_I8, nbytes)
            raw = builder.load(builder.bitcast(ptr(qa, ty[0], [rr, qoff]), vb.as_pointer()), align=1)
            if bits == 3:  # 24-bit groups g = bytes 3g, 3g+1, 3g+2 (little-endian), a zero byte on top
                zero_b = ir.Constant(vb, [0] * nbytes)
                mask = [b for g in range(4) for b in (3 * g, 3 * g + 1, 3 * g + 2, nbytes)]
                raw = builder.bitcast(builder.shuffle_vector(raw, zero_b, ir.Constant(ir.VectorType(_I32, 16), mask)),
                                      ir.VectorType(_I32, 4))
            else:
                raw = builder.zext(raw, ir.VectorType(_I32, nbytes))
            lanes = builder.shuffle_vector(raw, raw, ir.Constant(_V32I32, src))
            codes = builder.and_(builder.lshr(lanes, ir.Constant(_V32I32, shift)),
                                 ir.Constant(_V32I32, [(1 << bits) - 1] * 32))
            zv = builder.shuffle_vector(builder.insert_element(ir.Constant(_V32I32, ir.Undefined), zr,
                                                               ir.Constant(_I32, 0)),
                                        ir.Constant(_V32I32, ir.Undefined), ir.Constant(_V32I32, [0] * 32))
            sv = builder.shuffle_vector(builder.insert_element(ir.Constant(_V32F, ir.Undefined), sc,
                                                               ir.Constant(_I32, 0)),
                                        ir.Constant(_V32F, ir.Undefined), ir.Constant(_V32I32, [0] * 32))
            w = builder.fmul(builder.sitofp(builder.sub(codes, zv), _V32F), sv)
            xv = builder.load(builder.bitcast(ptr(xa, ty[5], [mm, kk]), _V32F.as_pointer()), align=4)
            ap = builder.bitcast(ptr(aa, ty[8], [ai, ir.Constant(_I64, 0)]), _V32F.as_pointer())
            builder.store(builder.fadd(builder.load(ap, align=4), builder.fmul(w, xv)), ap, align=4)
            return context.get_dummy_value()

        return sig, codegen

    intq_block.__doc__ = (f"acc[am, L] += (f32(c_L - zero) * scale) * x[m, k0 + L] for the 32 int{bits} codes of "
                          f"the {nbytes} bytes at q[r, qo:], lane L as in the module docstring; q, x, acc "
                          "C-contiguous, indices in bounds (the caller's).")
    return intq_block


int2_block = _make(2)
int3_block = _make(3)
