"""One block of a 16-entry code-book format for the Numba matmul (nf4, fp4, iq4_nl).

LLVM does not vectorise ``table[code]`` for 4-bit codes: it emits one scalar load per weight
(an nf4 GEMV at 4096 x 4096 took 4.7 ms where q4_0, decoded by arithmetic, takes 0.65). The
intrinsics here write the block's vector IR directly, with the table lookup as a register
permute where the target has one:

    avx512   vpermps on 16 lanes (one instruction for 16 codes)
    avx2     two 8-entry vpermps and a select on bit 3 of the code
    generic  per-lane extracts and scalar loads (the code LLVM made of the plain loop)

chosen when the kernel is compiled, from the feature string Numba compiles with (the host's,
unless NUMBA_CPU_FEATURES is set or NUMBA_CPU_NAME=generic empties it; a CPU name alone keeps the
host's features); that string is part of Numba's cache key, so a cached kernel is never run on a
CPU it was not compiled for.

The float operations are those of the plain loop, in the same order per lane:
``w = table[c] * scale`` (as the dequantizers), then ``acc += w * x``, no contraction into an FMA,
so the result has the same bits whichever lowering runs.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

MODES = ("avx512", "avx2", "generic")

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16I8, _V16I32, _V16F = ir.VectorType(_I8, 16), ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)
_V8I32, _V8F = ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)


def target_mode(context) -> str:
    """The lowering for the features Numba compiles this kernel for."""
    feats = getattr(context.codegen(), "_tm_features", "") or ""
    flags = set(feats.split(","))
    if "+avx512f" in flags:
        return "avx512"
    if "+avx2" in flags:
        return "avx2"
    return "generic"


def _lookup(builder, mode, tptr, idx):
    """<16 x float> table[idx[i]] for codes idx (<16 x i32>, each 0..15); tptr points at 16 floats."""
    if mode == "avx512":
        tv = builder.load(builder.bitcast(tptr, _V16F.as_pointer()), align=4)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F, _V16I32]),
                                            "llvm.x86.avx512.permvar.sf.512")
        return builder.call(fn, [tv, idx])
    if mode == "avx2":
        vp = builder.bitcast(tptr, _V8F.as_pointer())
        t_lo = builder.load(vp, align=4)
        t_hi = builder.load(builder.gep(vp, [ir.Constant(_I32, 1)]), align=4)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8F, [_V8F, _V8I32]),
                                            "llvm.x86.avx2.permps")
        halves = []
        for h in range(2):  # vpermps reads the low 3 bits of each index; bit 3 picks the table half
            ih = builder.shuffle_vector(idx, ir.Constant(_V16I32, ir.Undefined),
                                        ir.Constant(_V8I32, list(range(8 * h, 8 * h + 8))))
            upper = builder.icmp_unsigned("!=", builder.and_(ih, ir.Constant(_V8I32, [8] * 8)),
                                          ir.Constant(_V8I32, [0] * 8))
            halves.append(builder.select(upper, builder.call(fn, [t_hi, ih]), builder.call(fn, [t_lo, ih])))
        return builder.shuffle_vector(halves[0], halves[1], ir.Constant(_V16I32, list(range(16))))
    out = ir.Constant(_V16F, ir.Undefined)
    for i in range(16):
        li = ir.Constant(_I32, i)
        v = builder.load(builder.gep(tptr, [builder.extract_element(idx, li)]), align=4)
        out = builder.insert_element(out, v, li)
    return out


def _splat(builder, v):
    one = builder.insert_element(ir.Constant(_V16F, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(_V16F, ir.Undefined), ir.Constant(_V16I32, [0] * 16))


def _make(hi_first: bool, force: str | None):
    @intrinsic
    def lut16_block(typingctx, q, r, qo, table, scale, x, m, k0, acc, am):
        arrays = ((q, types.uint8, 2), (table, types.float32, 1), (x, types.float32, 2), (acc, types.float32, 2))
        for a, dt, nd in arrays:
            if not (isinstance(a, types.Array) and a.dtype == dt and a.ndim == nd and a.layout == "C"):
                raise TypingError(f"lut16_block: expected a C-contiguous {nd}-d {dt} array, got {a}")
        sig = types.void(q, r, qo, table, scale, x, m, k0, acc, am)

        def codegen(context, builder, signature, args):
            mode = force or target_mode(context)
            qa, rr, qoff, ta, sc, xa, mm, kk, aa, ai = args
            ty = signature.args
            rr, qoff, mm, kk, ai = (context.cast(builder, v, t, types.int64)
                                    for v, t in ((rr, ty[1]), (qoff, ty[2]), (mm, ty[6]), (kk, ty[7]), (ai, ty[9])))
            sc = context.cast(builder, sc, ty[4], types.float32)

            def ptr(arr, aty, idx):
                a = context.make_array(aty)(context, builder, arr)
                shape, strides = cgutils.unpack_tuple(builder, a.shape), cgutils.unpack_tuple(builder, a.strides)
                return cgutils.get_item_pointer2(context, builder, a.data, shape, strides, "C", idx)

            codes = builder.zext(builder.load(builder.bitcast(ptr(qa, ty[0], [rr, qoff]), _V16I8.as_pointer()),
                                              align=1), _V16I32)
            hi = builder.lshr(codes, ir.Constant(_V16I32, [4] * 16))
            lo = builder.and_(codes, ir.Constant(_V16I32, [15] * 16))
            tptr = ptr(ta, ty[3], [ir.Constant(_I64, 0)])
            s = _splat(builder, sc)
            xv = builder.bitcast(ptr(xa, ty[5], [mm, kk]), _V16F.as_pointer())
            av = builder.bitcast(ptr(aa, ty[8], [ai, ir.Constant(_I64, 0)]), _V16F.as_pointer())
            for h, idx in enumerate((hi, lo) if hi_first else (lo, hi)):
                w = builder.fmul(_lookup(builder, mode, tptr, idx), s)
                hp = ir.Constant(_I32, h)
                prod = builder.fmul(w, builder.load(builder.gep(xv, [hp]), align=4))
                a = builder.gep(av, [hp])
                builder.store(builder.fadd(builder.load(a, align=4), prod), a, align=4)
            return context.get_dummy_value()

        return sig, codegen

    lut16_block.__doc__ = (
        f"acc[am, 0:16] += (table[{'hi' if hi_first else 'lo'}(b_j)] * scale) * x[m, k0 + j] and "
        f"acc[am, 16:32] += (table[{'lo' if hi_first else 'hi'}(b_j)] * scale) * x[m, k0 + 16 + j] for the "
        "16 code bytes b_j = q[r, qo + j]; q, x and acc C-contiguous, the caller keeps every index in bounds "
        "and table 16 long.")
    return lut16_block


# bitsandbytes nf4 / fp4: element 2j is the high nibble (x split even/odd per chunk)
lut16_hi_first = _make(True, None)
# ggml iq4_nl: element j is the low nibble of byte j, element j + 16 its high nibble
lut16_lo_first = _make(False, None)


def forced(hi_first: bool, mode: str):
    """The intrinsic with a fixed lowering, for tests of every lowering on one machine."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    return _make(hi_first, mode)
