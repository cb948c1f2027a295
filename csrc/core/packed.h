// Prepacked weights for the int8-compute matmul, and quantized activations.
//
// Every format is reduced, per output row n and weight block b (32 values; 16 for q6_k), to
//   w[n,k] = a[n,b] * (u[n,k] - o[n,b]) + m[n,b]
// with u an unsigned code (4-bit for nibble formats, 8-bit otherwise), a fp32 scale, o an
// integer offset and m an fp32 additive min (q4_1, q4_k only). With activations quantized per
// block of 32 as x ~ dx * xq (dx = amax/127, xq = round_half_even(x / dx)), a block contributes
//   isum = sum(u * xq) - o * sum(xq)             (int32, exact)
//   acc  = acc + (float)isum * (a * dx)          (mul, then add: no FMA)
//   acc  = acc + m * (dx * (float)sum(xq))       (only when the format has m)
// summed block after block in K order; y = acc + bias. Every variant follows this order, so
// results are bit-identical across variants and thread counts.
//
// Layout: rows in tiles of NR = 16. For tile t and block b the codes of the 16 rows are stored
// in "quad-major" order so one 64-byte register holds 4 consecutive k of all 16 rows
// (byte r*4 + i = row r, k = 4j + i): VNNI's vpdpbusd then adds 4 products per row lane.
// 4-bit codes (block 32): register j (0..3) holds quad j in the low nibbles and quad j+4 in
// the high nibbles. 8-bit codes: block 32 -> 8 registers, block 16 -> 4 registers.
// Code-book formats (nf4, iq4_nl) store the 4-bit index; u = lut16[index].
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace pqk {

// Zeroed, 64-byte aligned bytes; buffers of 2 MiB and more are 2 MiB aligned and advised for
// transparent huge pages before first touch (with THP in "madvise" mode, the usual default, a
// GEMV streaming a 4096x4096 int4 weight through 4 KiB pages spends ~15% of its time on TLB
// misses). Move-only.
class ByteBuffer {
 public:
  ByteBuffer() = default;
  ByteBuffer(const ByteBuffer&) = delete;
  ByteBuffer& operator=(const ByteBuffer&) = delete;
  ByteBuffer(ByteBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
  ByteBuffer& operator=(ByteBuffer&& o) noexcept;
  ~ByteBuffer();
  void assign_zero(size_t n);  // throws std::bad_alloc
  uint8_t* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  uint8_t* p_ = nullptr;
  size_t n_ = 0;
};

constexpr int NR = 16;   // rows per tile
constexpr int QBLK = 32; // activation block

struct PackedWeight {
  int fmt = -1;
  int64_t n = 0, k = 0;
  int blk = 32;           // weight block along K (16 for q6_k)
  bool nibbles = true;    // 4-bit codes (else 8-bit)
  bool has_min = false;   // m term present
  bool row_offset = false;// o varies per (row, block) (int4 asymmetric); else o == o_const
  int32_t o_const = 0;
  bool lut = false;       // nibble -> code through lut16 (code-book formats nf4, iq4_nl)
  uint8_t lut16[16] = {};
  int64_t n_tiles = 0, nblk = 0;
  // a, o, m are stored once per group of par_every consecutive blocks (int4 group 128: 4,
  // nf4 block 64: 2, else 1): parameter index of block b is b / par_every.
  int64_t par_every = 1, npar = 0;
  int64_t par_index(int64_t tile, int64_t b) const { return (tile * npar + b / par_every) * NR; }
  int64_t tile_code_bytes = 0;  // bytes of codes per tile (all blocks)
  // 64-byte aligned storage
  uint8_t* codes = nullptr;     // [n_tiles][nblk][blk*NR (/2 if nibbles)]
  // a and m as fp32, or as fp16 (scale16/min16) for formats whose a and m are fp16 values
  // already (q4_0, q4_1, q8_0, iq4_nl, int4): lossless and a quarter less traffic for GEMV.
  float* scale = nullptr;       // [n_tiles][npar][NR]
  float* minv = nullptr;        // [n_tiles][npar][NR] or null
  uint16_t* scale16 = nullptr;  // [n_tiles][npar][NR] instead of scale
  uint16_t* min16 = nullptr;    // [n_tiles][npar][NR] instead of minv
  uint8_t* offs = nullptr;      // [n_tiles][npar][NR] or null (o <= 255: one byte, not four)
  // Two-level parameters (q4_k, q6_k) instead of scale / minv: a = sd[sup] * sq[pi] and
  // m = md[sup] * mq[pi], with sq / mq the format's 6- or 8-bit block multipliers as int8
  // [n_tiles][npar][NR] and sd / md the fp16 super-block factors as fp32 [n_tiles][nsup][NR],
  // sup = sup_index(pi). Each product is exact in fp32 (11-bit significand x 8-bit integer), so
  // a and m are the values a single-level fp32 table would hold; a GEMV reads 1 + 1/8 bytes per
  // row and block (q4_k: both) instead of 4 (+ 4): q4_k 6 -> 4.6 bits a weight, q6_k 10 -> 8.6.
  float* sd = nullptr;
  float* md = nullptr;
  int8_t* sq = nullptr;
  int8_t* mq = nullptr;
  int sup_shift = 0;            // log2(parameter groups per super-block)
  int64_t nsup = 0;             // super-blocks per row
  // index into sd / md for the parameter index pi ([tile][npar][NR] -> [tile][nsup][NR]; npar
  // is nsup << sup_shift, so the group bits shift out)
  static_assert(NR == 16, "sup_index takes the lane from the low 4 bits");
  int64_t sup_index(int64_t pi) const { return (((pi >> 4) >> sup_shift) << 4) | (pi & 15); }
  int max_offset = 0;           // largest o in offs (bytes from a quantizer: <= 15)
  // largest |a| and |m| (two-level: |sd| and |md| times 128, a bound; Inf if any is NaN / Inf,
  // only from hostile or damaged files), for compute=int8's range check of x (int8_x_exp_limit
  // in matmul.cpp) and the bf16 kernel's finite-scale test
  float max_a = 0.0f, max_m = 0.0f;
  ByteBuffer storage;
  int64_t block_code_bytes() const { return nibbles ? (int64_t)blk * NR / 2 : (int64_t)blk * NR; }
  size_t nbytes() const { return storage.size(); }
};

// Quantized activations: per row, xq [k] int8, dx [k/32] fp32, xs [k/16] int32 (sums per 16),
// and xn [k/32]: minus the block sum as int16 in the low half of an int32, 0 in the high half
// (|sum| <= 32 * 127), so one int16 dot product (VNNI vpdpwssd) with o in the low half of each
// lane yields -o * sum: the offset term without a separate multiply and subtract.
struct ActQ {
  int64_t m = 0, k = 0;
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::vector<int32_t> xs;
  std::vector<int32_t> xn;
  // xo [k/32]: -o * (block sum) for weights with one offset o for all rows (q4_0: 8), else
  // empty: the start value of a block's dot product, so the offset term costs no vector op
  std::vector<int32_t> xo;
  // xm [k/32]: dx * (float)(block sum) for weights with a min term (q4_1, q4_k), sized by the
  // caller, else empty: the min term's multiplier as every kernel computes it, once per row and
  // block rather than once per row, block and 16-row tile
  std::vector<float> xm;
  // xp [k/32]: minus the block's sums of x over positions p % 4 in {0, 1} and in {2, 3}, times
  // xp_f (o_const, or 1 for offsets per row), as the low and high int16 of an int32 (sized by the
  // caller, for the AVX2 nibble GEMM): the offset term as the start of the maddubs pair sums
  std::vector<int32_t> xp;
  int32_t xp_f = 1;
  // xu [k]: x + 128 as unsigned bytes (sized by the caller, for the AVX2 nibble GEMM over many
  // rows, tile_rows_su: maddubs' unsigned operand)
  std::vector<uint8_t> xu;
  const int8_t* row_q(int64_t i) const { return xq.data() + i * k; }
  const float* row_d(int64_t i) const { return dx.data() + i * (k / QBLK); }
  const int32_t* row_s(int64_t i) const { return xs.data() + i * (k / 16); }
  const int32_t* row_n(int64_t i) const { return xn.data() + i * (k / QBLK); }
  const int32_t* row_o(int64_t i) const { return xo.data() + i * (k / QBLK); }
  const float* row_m(int64_t i) const { return xm.data() + i * (k / QBLK); }
  const int32_t* row_p(int64_t i) const { return xp.data() + i * (k / QBLK); }
  const uint8_t* row_u(int64_t i) const { return xu.data() + i * k; }
  // xn (and xo, for a weight offset o_const != 0, xu, xp and xm, each where the caller sized it)
  // of row i from its xq, xs and dx (after quantize_act)
  void fill_xn(int64_t i, int32_t o_const) {
    const int32_t* s = row_s(i);
    int32_t* n = xn.data() + i * (k / QBLK);
    for (int64_t b = 0; b < k / QBLK; ++b) n[b] = (int32_t)(uint16_t)(int16_t)(-(s[2 * b] + s[2 * b + 1]));
    if (!xo.empty()) {
      int32_t* o = xo.data() + i * (k / QBLK);
      for (int64_t b = 0; b < k / QBLK; ++b) o[b] = -o_const * (s[2 * b] + s[2 * b + 1]);
    }
    if (!xu.empty()) {
      const int8_t* q = row_q(i);
      uint8_t* u = xu.data() + i * k;
      for (int64_t j = 0; j < k; ++j) u[j] = (uint8_t)(q[j] ^ (int8_t)0x80);
    }
    if (!xp.empty()) {
      const int8_t* q = row_q(i);
      int32_t* pp = xp.data() + i * (k / QBLK);
      const int32_t f = xp_f;
      for (int64_t b = 0; b < k / QBLK; ++b) {
        int32_t s01 = 0, s23 = 0;
        for (int t = 0; t < QBLK; t += 4) {
          s01 += q[b * QBLK + t] + q[b * QBLK + t + 1];
          s23 += q[b * QBLK + t + 2] + q[b * QBLK + t + 3];
        }
        // |f * s| <= 15 * 16 * 127: each fits int16
        pp[b] = (int32_t)((uint32_t)(uint16_t)(int16_t)(-f * s01) | ((uint32_t)(uint16_t)(int16_t)(-f * s23) << 16));
      }
    }
    if (!xm.empty()) {
      const float* d = row_d(i);
      float* mx = xm.data() + i * (k / QBLK);
      for (int64_t b = 0; b < k / QBLK; ++b) mx[b] = d[b] * (float)(s[2 * b] + s[2 * b + 1]);
    }
  }
};

}  // namespace pqk
