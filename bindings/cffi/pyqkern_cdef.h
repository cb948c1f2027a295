/* cffi declarations for libpyqkern.so: csrc/include/pyqkern/pyqkern.h (ABI version 1) with the
 * preprocessor parts removed (include guards, PQK_API, extern "C"), which cffi's cdef cannot
 * parse. Kept in the header's order and spelling; tests/test_cabi.py checks that every function
 * here has the real header's name, return type and parameter types, and that none is missing. */

typedef enum pqk_status {
  PQK_OK = 0,
  PQK_ERR_ARG = 1,
  PQK_ERR_SHAPE = 2,
  PQK_ERR_NONFINITE = 3,
  PQK_ERR_UNSUPPORTED = 4,
  PQK_ERR_ISA = 5,
  PQK_ERR_NOMEM = 6,
  PQK_ERR_INTERNAL = 7
} pqk_status;

typedef enum pqk_format {
  PQK_Q4_0 = 0,
  PQK_Q4_1 = 1,
  PQK_Q8_0 = 2,
  PQK_Q4_K = 3,
  PQK_Q6_K = 4,
  PQK_IQ4_NL = 5,
  PQK_NF4 = 6,
  PQK_INT4 = 7,
  PQK_INT8 = 8,
  PQK_FORMAT_COUNT = 9
} pqk_format;

typedef enum pqk_isa {
  PQK_ISA_ACTIVE = -1,
  PQK_ISA_REF = 0,
  PQK_ISA_AVX2 = 1,
  PQK_ISA_AVX512 = 2,
  PQK_ISA_AVX512VNNI = 3,
  PQK_ISA_NEON = 4,
  PQK_ISA_DOTPROD = 5,
  PQK_ISA_COUNT = 6
} pqk_isa;

typedef struct pqk_qparams {
  int32_t group;
  int32_t sym;
} pqk_qparams;

typedef struct pqk_row_bytes {
  int64_t q, s, z;
} pqk_row_bytes;

int32_t pqk_abi_version(void);
const char* pqk_last_error(void);
const char* pqk_format_name(int32_t fmt);
const char* pqk_isa_name(int32_t isa);

int32_t pqk_isa_runnable(int32_t isa);
pqk_status pqk_active_isa(int32_t* isa);
int32_t pqk_isa_compiled(int32_t isa);
const char* pqk_cpu_brand(void);
int32_t pqk_slot_variant(int32_t isa, const char* slot, int32_t fmt);
const char* pqk_cpu_features(void);

pqk_status pqk_set_num_threads(int32_t n);
int32_t pqk_get_num_threads(void);

pqk_status pqk_row_bytes_of(int32_t fmt, int64_t k, pqk_qparams* params, pqk_row_bytes* out);

pqk_status pqk_quantize(int32_t isa, int32_t fmt, const float* x, int64_t n, int64_t k,
                        int64_t ldx, const pqk_qparams* params, void* q, void* s, void* z);
pqk_status pqk_dequantize(int32_t isa, int32_t fmt, const void* q, const void* s,
                          const void* z, int64_t n, int64_t k, const pqk_qparams* params,
                          float* y);

typedef struct pqk_packed pqk_packed;

int32_t pqk_int8_supported(int32_t fmt, int64_t k, const pqk_qparams* params);
pqk_status pqk_pack(int32_t fmt, const void* q, const void* s, const void* z, int64_t n, int64_t k,
                    const pqk_qparams* params, pqk_packed** out);
void pqk_packed_free(pqk_packed* w);
int64_t pqk_packed_nbytes(const pqk_packed* w);

pqk_status pqk_matmul_int8(int32_t isa, const pqk_packed* w, const float* x, int64_t m, int64_t ldx,
                           const float* bias, float* y, int64_t ldy);

typedef struct pqk_lora {
  int32_t rank;
  const void* A;
  const void* Bp;
  float scale;
  const float* row_scale;
  int32_t dtype;
} pqk_lora;

pqk_status pqk_matmul_int8_lora(int32_t isa, const pqk_packed* w, const float* x, int64_t m, int64_t ldx,
                                const float* bias, float* y, int64_t ldy, const pqk_lora* adapters,
                                int32_t n_adapters, const int32_t* row_adapter);
pqk_status pqk_matmul_float_lora(int32_t isa, int32_t fmt, const void* q, const void* s, const void* z,
                                 int64_t n, int64_t k, const pqk_qparams* params, const float* x, int64_t m,
                                 int64_t ldx, const float* bias, float* y, int64_t ldy,
                                 const pqk_lora* adapters, int32_t n_adapters, const int32_t* row_adapter);

pqk_status pqk_matmul_float(int32_t isa, int32_t fmt, const void* q, const void* s, const void* z,
                            int64_t n, int64_t k, const pqk_qparams* params, const float* x, int64_t m,
                            int64_t ldx, const float* bias, float* y, int64_t ldy);
