// Decomposes every format into (u, a, o, m) per row and block (see packed.h) and interleaves
// rows into 16-row tiles. Runs once per weight (QLinear) so it is plain scalar code.
#include "pack.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "capi_util.h"
#include "threadpool.h"
#include "../kernels/common.h"

namespace pqk {

static bool is_intn(int fmt) { return fmt == PQK_INT2 || fmt == PQK_INT3 || fmt == PQK_INT4; }

bool int8_compute_supported(int fmt, int64_t k, const pqk_qparams& p) {
  if (k % QBLK) return false;
  if (is_intn(fmt)) return p.group == -1 || p.group >= 32;
  return true;  // nf4 blocks are >= 32, ggml blocks are 32/256
}

namespace {

int intn_bits(int fmt) { return fmt == PQK_INT2 ? 2 : (fmt == PQK_INT3 ? 3 : 4); }

// nf4 in the int8 path: codes rounded to 1/127 of absmax (the only lossy decomposition;
// compute="float" uses the exact code book).
int8_t nf4_i8(int i) { return (int8_t)std::nearbyint(127.0f * kNF4[i]); }
// fp4 likewise: 127 * code rounded (its smallest magnitude, 1/192, becomes 1/127).
int8_t fp4_i8(int i) { return (int8_t)std::nearbyint(127.0f * kFP4[i]); }

struct RowDecomp {
  std::vector<uint8_t> u;   // [k]
  std::vector<float> a, m;  // [nblk] (single-level formats)
  std::vector<int32_t> o;   // [nblk]
  // two-level formats (q4_k, q6_k): a = sd[super-block] * sq[block], m = md * mq
  std::vector<float> sd, md;   // [k / 256]
  std::vector<int8_t> sq, mq;  // [nblk]
};

// q4_k 6-bit scale/min of sub-block j
void k4_scale_min(int j, const uint8_t* sc, uint8_t* d, uint8_t* m) {
  if (j < 4) { *d = sc[j] & 63; *m = sc[j + 4] & 63; }
  else { *d = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4); *m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4); }
}

void decompose_row(int fmt, const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t k, const pqk_qparams& p,
                   int blk, RowDecomp& r) {
  const int64_t nb = k / blk;
  r.u.assign(k, 0); r.a.assign(nb, 0.f); r.m.assign(nb, 0.f); r.o.assign(nb, 0);
  if (fmt == PQK_Q4_K || fmt == PQK_Q6_K) {
    r.sd.assign(k / 256, 0.f); r.md.assign(k / 256, 0.f); r.sq.assign(nb, 0); r.mq.assign(nb, 0);
  }
  switch (fmt) {
    case PQK_Q4_0: case PQK_Q4_1: case PQK_IQ4_NL: {
      const int bytes = fmt == PQK_Q4_1 ? Q4_1_BYTES : Q4_0_BYTES;
      const int off = fmt == PQK_Q4_1 ? 4 : 2;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blkp = q + b * bytes;
        r.a[b] = load_f16(blkp);
        if (fmt == PQK_Q4_1) r.m[b] = load_f16(blkp + 2);
        r.o[b] = fmt == PQK_Q4_0 ? 8 : (fmt == PQK_IQ4_NL ? 128 : 0);
        for (int j = 0; j < 16; ++j) {
          uint8_t lo = blkp[off + j] & 0xF, hi = blkp[off + j] >> 4;
          r.u[b * 32 + j] = lo; r.u[b * 32 + 16 + j] = hi;
        }
      }
      break;
    }
    case PQK_Q8_0:
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blkp = q + b * Q8_0_BYTES;
        r.a[b] = load_f16(blkp);
        r.o[b] = 128;
        for (int j = 0; j < 32; ++j) r.u[b * 32 + j] = (uint8_t)((int)(int8_t)blkp[2 + j] + 128);
      }
      break;
    case PQK_INT8: {
      float sc; std::memcpy(&sc, s, 4);
      for (int64_t b = 0; b < nb; ++b) { r.a[b] = sc; r.o[b] = 128; }
      for (int64_t j = 0; j < k; ++j) r.u[j] = (uint8_t)((int)(int8_t)q[j] + 128);
      break;
    }
    case PQK_NF4: case PQK_FP4: {
      const int64_t g = p.group;
      for (int64_t b = 0; b < nb; ++b) {
        float amax; std::memcpy(&amax, s + 4 * ((b * blk) / g), 4);
        r.a[b] = amax / 127.0f;
        r.o[b] = 128;
      }
      for (int64_t j = 0; j < k; j += 2) {
        uint8_t c = q[j / 2];
        r.u[j] = c >> 4;  // index; pack_weight sets the lut
        r.u[j + 1] = c & 0xF;
      }
      break;
    }
    case PQK_INT2: case PQK_INT3: case PQK_INT4: {
      // codes stay in 4-bit lanes in the packed layout (int2/int3 run through the int4 kernels)
      const int bits = intn_bits(fmt);
      const int64_t g = p.group == -1 ? k : p.group;
      for (int64_t b = 0; b < nb; ++b) {
        int64_t gi = (b * blk) / g;
        uint16_t h; std::memcpy(&h, s + 2 * gi, 2);
        r.a[b] = fp16_to_fp32(h);
        r.o[b] = p.sym ? (1 << (bits - 1)) : z[gi];
      }
      if (bits == 4) {
        for (int64_t j = 0; j < k; j += 2) { r.u[j] = q[j / 2] & 0xF; r.u[j + 1] = q[j / 2] >> 4; }
      } else {
        const uint32_t mask = (1u << bits) - 1;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t bit = j * bits;
          uint32_t v = q[bit >> 3];
          if ((bit & 7) + bits > 8) v |= (uint32_t)q[(bit >> 3) + 1] << 8;
          r.u[j] = (uint8_t)((v >> (bit & 7)) & mask);
        }
      }
      break;
    }
    case PQK_Q4_K:
      for (int64_t sb = 0; sb < k / 256; ++sb) {
        const uint8_t* bp = q + sb * Q4_K_BYTES;
        const float d = load_f16(bp), dmin = load_f16(bp + 2);
        const uint8_t* sc = bp + 4; const uint8_t* qs = bp + 16;
        r.sd[sb] = d;
        r.md[sb] = -dmin;  // -(dmin * mj) == (-dmin) * mj: exact products
        for (int j = 0; j < 8; ++j) {
          uint8_t scj, mj; k4_scale_min(j, sc, &scj, &mj);
          int64_t b = sb * 8 + j;
          r.sq[b] = (int8_t)scj;  // 6 bits
          r.mq[b] = (int8_t)mj;
          r.o[b] = 0;
          const uint8_t* qq = qs + (j / 2) * 32;
          for (int l = 0; l < 32; ++l) r.u[b * 32 + l] = (j & 1) ? (qq[l] >> 4) : (qq[l] & 0xF);
        }
      }
      break;
    case PQK_Q6_K:
      for (int64_t sb = 0; sb < k / 256; ++sb) {
        const uint8_t* bp = q + sb * Q6_K_BYTES;
        const uint8_t* ql = bp; const uint8_t* qh = bp + 128; const int8_t* sc = (const int8_t*)(bp + 192);
        const float d = load_f16(bp + 208);
        uint8_t vals[256];
        for (int h = 0; h < 2; ++h) {  // two 128-halves
          const uint8_t* l8 = ql + 64 * h; const uint8_t* h8 = qh + 32 * h;
          for (int l = 0; l < 32; ++l) {
            vals[128 * h + l] = (uint8_t)((l8[l] & 0xF) | (((h8[l] >> 0) & 3) << 4));
            vals[128 * h + l + 32] = (uint8_t)((l8[l + 32] & 0xF) | (((h8[l] >> 2) & 3) << 4));
            vals[128 * h + l + 64] = (uint8_t)((l8[l] >> 4) | (((h8[l] >> 4) & 3) << 4));
            vals[128 * h + l + 96] = (uint8_t)((l8[l + 32] >> 4) | (((h8[l] >> 6) & 3) << 4));
          }
        }
        r.sd[sb] = d;
        for (int j = 0; j < 16; ++j) {
          int64_t b = sb * 16 + j;
          r.sq[b] = sc[j];
          r.o[b] = 32;
          for (int l = 0; l < 16; ++l) r.u[b * 16 + l] = vals[j * 16 + l];
        }
      }
      break;
  }
}

// Next 64-byte aligned address (absolute, not relative to the buffer start) at or after off.
uint8_t* align64(ByteBuffer& st, size_t& off, size_t bytes) {
  uintptr_t base = (uintptr_t)st.data();
  off = (size_t)(((base + off + 63) & ~(uintptr_t)63) - base);
  uint8_t* p = st.data() + off;
  off += bytes;
  return p;
}

}  // namespace

void pack_weight(int fmt, const uint8_t* q, const uint8_t* s, const uint8_t* z, int64_t n, int64_t k,
                 const pqk_qparams& p, PackedWeight& w) {
  if (!int8_compute_supported(fmt, k, p))
    throw Error(PQK_ERR_UNSUPPORTED, std::string(pqk_format_name(fmt)) +
                                         ": int8 compute needs K % 32 == 0 and int4 groups >= 32");
  w.fmt = fmt; w.n = n; w.k = k;
  w.blk = fmt == PQK_Q6_K ? 16 : 32;
  w.nibbles = fmt == PQK_Q4_0 || fmt == PQK_Q4_1 || fmt == PQK_IQ4_NL || fmt == PQK_NF4 || fmt == PQK_FP4 ||
              is_intn(fmt) || fmt == PQK_Q4_K;
  w.has_min = fmt == PQK_Q4_1 || fmt == PQK_Q4_K;
  w.row_offset = is_intn(fmt) && !p.sym;
  w.lut = fmt == PQK_NF4 || fmt == PQK_FP4 || fmt == PQK_IQ4_NL;
  for (int i = 0; i < 16; ++i)
    w.lut16[i] = (uint8_t)((fmt == PQK_NF4 ? nf4_i8(i) : (fmt == PQK_FP4 ? fp4_i8(i) : kIQ4NL[i])) + 128);
  w.o_const = fmt == PQK_Q4_0 ? 8 : (is_intn(fmt) ? 1 << (intn_bits(fmt) - 1) : (fmt == PQK_Q6_K ? 32 : (fmt == PQK_Q4_1 || fmt == PQK_Q4_K ? 0 : 128)));
  w.n_tiles = (n + NR - 1) / NR;
  w.nblk = k / w.blk;
  const int64_t bcb = w.block_code_bytes();
  w.tile_code_bytes = bcb * w.nblk;
  // parameters shared by several blocks (int4 groups, nf4/fp4 blocks > 32) are stored once
  if (is_intn(fmt)) w.par_every = (p.group == -1 ? k : p.group) / w.blk;
  else if (fmt == PQK_NF4 || fmt == PQK_FP4) w.par_every = p.group / w.blk;
  else if (fmt == PQK_INT8) w.par_every = w.nblk;  // one scale per row
  else w.par_every = 1;
  const bool f16 = fmt == PQK_Q4_0 || fmt == PQK_Q4_1 || fmt == PQK_Q8_0 || fmt == PQK_IQ4_NL || is_intn(fmt);
  const bool two_level = fmt == PQK_Q4_K || fmt == PQK_Q6_K;
  w.npar = w.nblk / w.par_every;
  const size_t code_bytes = (size_t)(w.n_tiles * w.tile_code_bytes);
  const size_t par_bytes = (size_t)(w.n_tiles * w.npar * NR * 4);
  const size_t fpar_bytes = f16 ? par_bytes / 2 : par_bytes;
  const size_t off_bytes = (size_t)(w.n_tiles * w.npar * NR);
  if (two_level) {
    w.sup_shift = fmt == PQK_Q4_K ? 3 : 4;  // 8 blocks of 32 / 16 blocks of 16 per 256
    w.nsup = k / 256;
  }
  const size_t sup_bytes = (size_t)(w.n_tiles * w.nsup * NR * 4);
  const size_t npars = two_level ? sup_bytes + off_bytes : fpar_bytes;  // bytes of a (and of m)
  w.storage.assign_zero(code_bytes + npars * (1 + (w.has_min ? 1 : 0)) + off_bytes * (w.row_offset ? 1 : 0) + 64 * 7);
  size_t off = 0;
  w.codes = align64(w.storage, off, code_bytes);
  if (two_level) {
    w.sd = (float*)align64(w.storage, off, sup_bytes);
    w.sq = (int8_t*)align64(w.storage, off, off_bytes);
    if (w.has_min) {
      w.md = (float*)align64(w.storage, off, sup_bytes);
      w.mq = (int8_t*)align64(w.storage, off, off_bytes);
    }
  } else if (f16) {
    w.scale16 = (uint16_t*)align64(w.storage, off, fpar_bytes);
    w.min16 = w.has_min ? (uint16_t*)align64(w.storage, off, fpar_bytes) : nullptr;
  } else {
    w.scale = (float*)align64(w.storage, off, par_bytes);
    w.minv = w.has_min ? (float*)align64(w.storage, off, par_bytes) : nullptr;
  }
  w.offs = w.row_offset ? align64(w.storage, off, off_bytes) : nullptr;

  pqk_qparams pp = p;
  pqk_row_bytes rb = row_bytes(fmt, k, pp);
  parallel_for(w.n_tiles, 1, [&](int64_t t0, int64_t t1) {
    RowDecomp rd;
    for (int64_t t = t0; t < t1; ++t) {
      uint8_t* ct = w.codes + t * w.tile_code_bytes;
      for (int r = 0; r < NR; ++r) {
        int64_t row = t * NR + r;
        if (row >= n) break;  // padding rows stay zero (scale 0)
        decompose_row(fmt, q + row * rb.q, s ? s + row * rb.s : nullptr, z ? z + row * rb.z : nullptr, k, pp,
                      w.blk, rd);
        for (int64_t b = 0; b < w.nblk; ++b) {
          int64_t pi = w.par_index(t, b) + r;
          if (w.sq) {
            w.sq[pi] = rd.sq[b];
            w.sd[w.sup_index(pi)] = rd.sd[b * w.blk / 256];
            if (w.mq) {
              w.mq[pi] = rd.mq[b];
              w.md[w.sup_index(pi)] = rd.md[b * w.blk / 256];
            }
          } else if (w.scale16) {
            w.scale16[pi] = fp32_to_fp16(rd.a[b]);  // exact: these formats store a (and m) as fp16
            if (w.min16) w.min16[pi] = fp32_to_fp16(rd.m[b]);
          } else {
            w.scale[pi] = rd.a[b];
            if (w.minv) w.minv[pi] = rd.m[b];
          }
          if (w.offs) w.offs[pi] = (uint8_t)rd.o[b];
          uint8_t* cb = ct + b * bcb;
          const uint8_t* u = rd.u.data() + b * w.blk;
          if (w.nibbles) {  // 32 codes: reg j low nibble = quad j, high nibble = quad j+4
            for (int j = 0; j < 4; ++j)
              for (int i = 0; i < 4; ++i)
                cb[j * 64 + r * 4 + i] = (uint8_t)(u[4 * j + i] | (u[16 + 4 * j + i] << 4));
          } else {
            for (int j = 0; j < w.blk / 4; ++j)
              for (int i = 0; i < 4; ++i) cb[j * 64 + r * 4 + i] = u[4 * j + i];
          }
        }
      }
    }
  });
  if (w.offs)  // kernels with a bounded offset table check this
    for (size_t i = 0; i < off_bytes; ++i) w.max_offset = std::max<int>(w.max_offset, w.offs[i]);
  const int64_t npi = w.n_tiles * w.npar * NR;
  // the largest |a| and |m|, padding rows included (0); Inf for any NaN / Inf among them (fp16:
  // the largest magnitude bits are the largest value, NaN bits sort above Inf's)
  auto max_abs = [&](const float* f32, const uint16_t* f16, const float* d, int64_t nd) {
    float mx = 0.0f;
    if (f16) {
      uint16_t h = 0;
      for (int64_t i = 0; i < npi; ++i) h = std::max<uint16_t>(h, f16[i] & 0x7FFF);
      mx = (h & 0x7C00) == 0x7C00 ? INFINITY : fp16_to_fp32(h);
    } else if (f32) {
      for (int64_t i = 0; i < npi; ++i) mx = std::isnan(f32[i]) ? INFINITY : std::max(mx, std::fabs(f32[i]));
    } else if (d) {
      for (int64_t i = 0; i < nd; ++i) mx = std::isnan(d[i]) ? INFINITY : std::max(mx, std::fabs(d[i]));
      mx *= 128.0f;  // times the int8 block multipliers
    }
    return mx;
  };
  const int64_t nsd = w.n_tiles * w.nsup * NR;
  w.max_a = max_abs(w.scale, w.scale16, w.sd, nsd);
  w.max_m = max_abs(w.minv, w.min16, w.md, nsd);
}

}  // namespace pqk
