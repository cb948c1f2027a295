/* pyqkern C ABI example: quantize a weight matrix to q4_0 and to int4 (GPTQ-style, group 64,
 * asymmetric), then run y = x . W^T + bias, with and without a LoRA adapter, through both
 * compute paths (pqk_matmul_int8 on a prepacked weight, pqk_matmul_float), and check every result
 * against a naive float loop over the dequantized weight.
 *
 * Build (paths from python -c "import pyqkern; print(pyqkern.get_include(), pyqkern.get_library())"):
 *   cc -std=c99 -O2 -I<include> quantize_matmul.c <libdir>/libpyqkern.so -Wl,-rpath,<libdir> -lm
 * Exit code 0 when every check passes, 1 when a result is off, 2 when a call fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pyqkern/pyqkern.h>

enum { N = 40, K = 128, M = 3, RANK = 4, LDX = K + 8, LDY = N + 5 };

static int g_fail = 0;

#define CALL(expr)                                                                    \
  do {                                                                                \
    pqk_status st_ = (expr);                                                          \
    if (st_ != PQK_OK) {                                                              \
      fprintf(stderr, "%s failed: status %d: %s\n", #expr, (int)st_, pqk_last_error()); \
      exit(2);                                                                        \
    }                                                                                 \
  } while (0)

static void* xmalloc(size_t nbytes) {
  void* p = calloc(nbytes ? nbytes : 1, 1);
  if (!p) {
    fprintf(stderr, "out of memory\n");
    exit(2);
  }
  return p;
}

/* Deterministic uniform values in [-1, 1) (a 32-bit LCG: same numbers on every platform). */
static uint32_t g_seed = 12345u;
static float frand(void) {
  g_seed = g_seed * 1664525u + 1013904223u;
  return (float)((g_seed >> 8) & 0xFFFFFF) / 8388608.0f - 1.0f;
}

/* One result against its reference: |y - ref| <= bound[i][j] everywhere. */
static void check(const char* what, const float* y, const double* ref, const double* bound) {
  double worst = 0.0, ratio = 0.0;
  int ok = 1;
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      double e = fabs((double)y[i * LDY + j] - ref[i * N + j]);
      if (!(e <= bound[i * N + j])) ok = 0; /* also catches NaN */
      if (e > worst) worst = e;
      if (e / bound[i * N + j] > ratio) ratio = e / bound[i * N + j];
    }
  printf("%-4s %-28s max|err| %.3e (%.0f%% of bound)\n", ok ? "PASS" : "FAIL", what, worst, 100.0 * ratio);
  if (!ok) g_fail = 1;
}

static int run_format(int32_t fmt, pqk_qparams params, const float* w, const float* x, const float* bias,
                      const float* A, const float* B, float lora_scale) {
  const char* name = pqk_format_name(fmt);
  pqk_row_bytes rb;
  CALL(pqk_row_bytes_of(fmt, K, &params, &rb)); /* also fills in the format's default params */
  void* q = xmalloc((size_t)(N * rb.q));
  void* s = rb.s ? xmalloc((size_t)(N * rb.s)) : NULL;
  void* z = rb.z ? xmalloc((size_t)(N * rb.z)) : NULL;
  float* wd = xmalloc(sizeof(float) * N * K);
  CALL(pqk_quantize(PQK_ISA_ACTIVE, fmt, w, N, K, K, &params, q, s, z));
  CALL(pqk_dequantize(PQK_ISA_ACTIVE, fmt, q, s, z, N, K, &params, wd));

  double qerr = 0.0;
  for (int i = 0; i < N * K; i++) qerr = fmax(qerr, fabs((double)wd[i] - w[i]));
  printf("%s: group %d sym %d, %lld+%lld+%lld bytes per row, max|W - deq(quant(W))| %.4f\n", name,
         (int)params.group, (int)params.sym, (long long)rb.q, (long long)rb.s, (long long)rb.z, qerr);
  if (!(qerr < 0.25)) { /* 4-bit codes over [-1, 1): at most ~1/15 of a block's range */
    printf("FAIL %s quantization error too large\n", name);
    g_fail = 1;
  }

  /* The adapter: Bp is B [N, RANK] in tiles of 16 output rows, zero padded (see pyqkern.h). */
  const int ntiles = (N + 15) / 16;
  float* bp = xmalloc(sizeof(float) * ntiles * RANK * 16);
  for (int j = 0; j < N; j++)
    for (int r = 0; r < RANK; r++) bp[((j / 16) * RANK + r) * 16 + j % 16] = B[j * RANK + r];
  pqk_lora ad;
  memset(&ad, 0, sizeof ad);
  ad.rank = RANK;
  ad.A = A;
  ad.Bp = bp;
  ad.scale = lora_scale;
  ad.row_scale = NULL;
  ad.dtype = 0; /* fp32 */
  const int32_t row_adapter[M] = {0, -1, 0}; /* row 1 runs without the adapter */

  /* Naive float references in double: base = x . deq(W)^T + bias, lora adds scale * (x.A^T).B^T.
   * Bounds: float path: fp32 accumulation slack; int8 path: activations are quantized per block
   * of 32 with step dx = amax/127, so each x moves by at most dx/2. */
  double* ref_base = xmalloc(sizeof(double) * M * N);
  double* ref_lora = xmalloc(sizeof(double) * M * N);
  double* bnd_f = xmalloc(sizeof(double) * M * N);
  double* bnd_fl = xmalloc(sizeof(double) * M * N);
  double* bnd_i = xmalloc(sizeof(double) * M * N);
  double* bnd_il = xmalloc(sizeof(double) * M * N);
  for (int i = 0; i < M; i++) {
    const float* xi = x + (size_t)i * LDX;
    double half_dx[K / 32];
    for (int b = 0; b < K / 32; b++) {
      double amax = 0.0;
      for (int kk = b * 32; kk < b * 32 + 32; kk++) amax = fmax(amax, fabs(xi[kk]));
      half_dx[b] = 0.5 * amax / 127.0;
    }
    double xa[RANK], xa_abs[RANK], xa_q[RANK];
    for (int r = 0; r < RANK; r++) {
      xa[r] = xa_abs[r] = xa_q[r] = 0.0;
      for (int kk = 0; kk < K; kk++) {
        xa[r] += (double)xi[kk] * A[r * K + kk];
        xa_abs[r] += fabs((double)xi[kk] * A[r * K + kk]);
        xa_q[r] += half_dx[kk / 32] * fabs(A[r * K + kk]);
      }
    }
    for (int j = 0; j < N; j++) {
      double acc = 0.0, mag = 0.0, qmove = 0.0;
      for (int kk = 0; kk < K; kk++) {
        acc += (double)xi[kk] * wd[j * K + kk];
        mag += fabs((double)xi[kk] * wd[j * K + kk]);
        qmove += half_dx[kk / 32] * fabs(wd[j * K + kk]);
      }
      double lo = 0.0, lo_mag = 0.0, lo_q = 0.0;
      if (row_adapter[i] == 0)
        for (int r = 0; r < RANK; r++) {
          lo += lora_scale * xa[r] * B[j * RANK + r];
          lo_mag += fabs(lora_scale * B[j * RANK + r]) * xa_abs[r];
          lo_q += fabs(lora_scale * B[j * RANK + r]) * xa_q[r];
        }
      const double slack = 1e-5 * (mag + lo_mag + fabs(bias[j])) + 1e-6;
      ref_base[i * N + j] = acc + bias[j];
      ref_lora[i * N + j] = acc + lo + bias[j];
      bnd_f[i * N + j] = slack;
      bnd_fl[i * N + j] = slack;
      bnd_i[i * N + j] = qmove + slack;
      bnd_il[i * N + j] = qmove + lo_q + slack;
    }
  }

  float* y = xmalloc(sizeof(float) * M * LDY);
  char what[64];

  CALL(pqk_matmul_float(PQK_ISA_ACTIVE, fmt, q, s, z, N, K, &params, x, M, LDX, bias, y, LDY));
  snprintf(what, sizeof what, "%s float + bias", name);
  check(what, y, ref_base, bnd_f);

  CALL(pqk_matmul_float_lora(PQK_ISA_ACTIVE, fmt, q, s, z, N, K, &params, x, M, LDX, bias, y, LDY, &ad, 1,
                             row_adapter));
  snprintf(what, sizeof what, "%s float + bias + lora", name);
  check(what, y, ref_lora, bnd_fl);

  if (!pqk_int8_supported(fmt, K, &params)) {
    printf("FAIL %s: int8 compute not supported for K=%d\n", name, K);
    g_fail = 1;
  } else {
    pqk_packed* pw = NULL;
    CALL(pqk_pack(fmt, q, s, z, N, K, &params, &pw));
    printf("%s: packed weight %lld bytes\n", name, (long long)pqk_packed_nbytes(pw));
    CALL(pqk_matmul_int8(PQK_ISA_ACTIVE, pw, x, M, LDX, bias, y, LDY));
    snprintf(what, sizeof what, "%s int8 + bias", name);
    check(what, y, ref_base, bnd_i);
    CALL(pqk_matmul_int8_lora(PQK_ISA_ACTIVE, pw, x, M, LDX, bias, y, LDY, &ad, 1, row_adapter));
    snprintf(what, sizeof what, "%s int8 + bias + lora", name);
    check(what, y, ref_lora, bnd_il);
    pqk_packed_free(pw);
  }

  free(y);
  free(bnd_il);
  free(bnd_i);
  free(bnd_fl);
  free(bnd_f);
  free(ref_lora);
  free(ref_base);
  free(bp);
  free(wd);
  free(z);
  free(s);
  free(q);
  return 0;
}

int main(void) {
  if (pqk_abi_version() != PQK_ABI_VERSION) {
    fprintf(stderr, "library ABI %d, header ABI %d\n", (int)pqk_abi_version(), PQK_ABI_VERSION);
    return 2;
  }
  int32_t isa = -1;
  CALL(pqk_active_isa(&isa));
  printf("pyqkern C ABI %d, variant %s, %d threads\n", (int)pqk_abi_version(), pqk_isa_name(isa),
         (int)pqk_get_num_threads());

  float* w = xmalloc(sizeof(float) * N * K);
  float* x = xmalloc(sizeof(float) * M * LDX);
  float* bias = xmalloc(sizeof(float) * N);
  float* A = xmalloc(sizeof(float) * RANK * K);
  float* B = xmalloc(sizeof(float) * N * RANK);
  for (int i = 0; i < N * K; i++) w[i] = frand();
  for (int i = 0; i < M; i++)
    for (int kk = 0; kk < LDX; kk++) x[i * LDX + kk] = kk < K ? frand() : NAN; /* padding is never read */
  for (int j = 0; j < N; j++) bias[j] = 0.5f * frand();
  for (int i = 0; i < RANK * K; i++) A[i] = 0.1f * frand();
  for (int i = 0; i < N * RANK; i++) B[i] = 0.1f * frand();

  pqk_qparams p_q4_0 = {0, 0};  /* ggml q4_0: blocks of 32, no parameters */
  pqk_qparams p_int4 = {64, 0}; /* int4: group 64, asymmetric (zero points) */
  run_format(PQK_Q4_0, p_q4_0, w, x, bias, A, B, 2.0f);
  run_format(PQK_INT4, p_int4, w, x, bias, A, B, 2.0f);

  free(B);
  free(A);
  free(bias);
  free(x);
  free(w);
  if (g_fail) {
    printf("quantize_matmul: FAILED\n");
    return 1;
  }
  printf("quantize_matmul: all checks passed\n");
  return 0;
}
