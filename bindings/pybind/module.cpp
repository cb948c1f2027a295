// pybind11 module pyqkern._native: buffer checks, GIL released, calls the C ABI.
// Python-side validation (pyqkern/_api.py) gives the friendly errors; the checks here are
// the last line of defence so that no call can read or write past a buffer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "pyqkern/pyqkern.h"

namespace py = pybind11;

namespace {

// f() with the GIL released, for the kernels. Not py::gil_scoped_release: its destructor takes
// the GIL back, and a daemon thread that does so while the interpreter exits is ended there
// (PyEval_RestoreThread calls pthread_exit); the forced unwind out of that noexcept destructor
// aborted the process ("terminate called without an active exception") whenever a daemon thread
// was inside a matmul at exit. Taken back in ordinary code, the unwind passes through (pybind11
// rethrows abi::__forced_unwind) and the thread ends as a pure-Python daemon thread would.
template <class F>
auto without_gil(F&& f) -> decltype(f()) {
  PyThreadState* ts = PyEval_SaveThread();
  decltype(f()) r;
  try {
    r = f();
  } catch (...) {
    PyEval_RestoreThread(ts);
    throw;
  }
  PyEval_RestoreThread(ts);
  return r;
}

void check(pqk_status st) {
  if (st == PQK_OK) return;
  std::string msg = pqk_last_error();
  switch (st) {
    case PQK_ERR_ARG:
    case PQK_ERR_SHAPE:
    case PQK_ERR_NONFINITE: throw py::value_error(msg);
    case PQK_ERR_UNSUPPORTED:
      PyErr_SetString(PyExc_NotImplementedError, msg.c_str());
      throw py::error_already_set();
    case PQK_ERR_NOMEM:  // MemoryError with the library's message (std::bad_alloc would drop it)
      PyErr_SetString(PyExc_MemoryError, msg.c_str());
      throw py::error_already_set();
    default: throw std::runtime_error(msg);
  }
}

pqk_row_bytes row_bytes(int fmt, int64_t k, pqk_qparams& p) {
  pqk_row_bytes rb;
  check(pqk_row_bytes_of(fmt, k, &p, &rb));
  return rb;
}

// a * b (* c) for a buffer size, or ValueError if it does not fit int64 (absurd n / k from a
// caller of this private module; the C ABI refuses such sizes too, but only after these checks)
int64_t size_of(int64_t a, int64_t b, int64_t c = 1) {
  int64_t ab, abc;
  if (a < 0 || b < 0 || c < 0 || __builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc))
    throw py::value_error("buffer size " + std::to_string(a) + " x " + std::to_string(b) + " x " +
                          std::to_string(c) + " is negative or does not fit 64 bits");
  return abc;
}

// The kernels take float* / uint16_t*: an array on an address that is not a multiple of its item
// size (a NumPy view into a byte buffer at an odd offset) would be undefined behaviour there.
// pyqkern's Python wrappers copy such arrays first; this is the check for direct callers.
void check_aligned(const void* p, int64_t itemsize, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % (uintptr_t)itemsize != 0)
    throw py::value_error(std::string(what) + ": data is not aligned to its item size (" + std::to_string(itemsize) +
                          " bytes)");
}

py::buffer_info contiguous(py::buffer b, bool writable, int64_t need, const char* what) {
  py::buffer_info info = b.request(writable);
  int64_t nbytes = info.itemsize;
  for (auto s : info.shape) nbytes *= s;
  // contiguity: strides must be C-order compact
  int64_t expect = info.itemsize;
  for (int i = (int)info.ndim - 1; i >= 0; --i) {
    if (info.shape[i] != 1 && info.strides[i] != expect)
      throw py::value_error(std::string(what) + ": buffer must be C-contiguous");
    expect *= info.shape[i];
  }
  if (nbytes < need)
    throw py::value_error(std::string(what) + ": buffer has " + std::to_string(nbytes) + " bytes, need " +
                          std::to_string(need));
  return info;
}

// The optional s / z sections of a quantized tensor: checked buffers, or null when the format has none.
struct Sections {
  py::buffer_info si, zi;
  void* s = nullptr;
  void* z = nullptr;
  Sections(const pqk_row_bytes& rb, int64_t n, const py::object& so, const py::object& zo, bool writable) {
    if (rb.s) {
      if (so.is_none()) throw py::value_error("s buffer missing");
      si = contiguous(so.cast<py::buffer>(), writable, size_of(n, rb.s), "s");
      s = si.ptr;
    }
    if (rb.z) {
      if (zo.is_none()) throw py::value_error("z buffer missing");
      zi = contiguous(zo.cast<py::buffer>(), writable, size_of(n, rb.z), "z");
      z = zi.ptr;
    }
  }
};

struct Packed {
  pqk_packed* p = nullptr;
  int64_t n = 0, k = 0;
  ~Packed() { pqk_packed_free(p); }
};

// float32 2-D array with contiguous rows -> (ptr, m, k, row stride in floats)
struct Rows { const float* p; int64_t m, k, ld; };
Rows rows_of(const py::array& x, const char* what) {
  if (x.dtype().kind() != 'f' || x.itemsize() != 4) throw py::type_error(std::string(what) + " must be float32");
  if (x.ndim() != 2) throw py::value_error(std::string(what) + " must be 2-D");
  const int64_t m = x.shape(0), k = x.shape(1);
  if (k > 1 && x.strides(1) != 4) throw py::value_error(std::string(what) + " rows must be contiguous");
  if (m > 1 && (x.strides(0) % 4 != 0 || x.strides(0) < 4 * k)) throw py::value_error(std::string(what) + ": bad row stride");
  check_aligned(x.data(), 4, what);
  return {static_cast<const float*>(x.data()), m, k, m > 1 ? (int64_t)(x.strides(0) / 4) : k};
}

// x has the weight's K
void check_k(int64_t xk, int64_t wk) {
  if (xk != wk) throw py::value_error("x has K=" + std::to_string(xk) + ", weight has K=" + std::to_string(wk));
}

// out: float32 [m, n] with contiguous rows, writeable
Rows out_rows(const py::array& y, int64_t m, int64_t n) {
  Rows yr = rows_of(y, "out");
  if (yr.m != m || yr.k != n) throw py::value_error("out has the wrong shape");
  if (!y.writeable()) throw py::value_error("out is read-only");
  return yr;
}

const float* bias_ptr(const py::object& bias, int64_t n) {
  if (bias.is_none()) return nullptr;
  py::array b = bias.cast<py::array>();
  if (b.dtype().kind() != 'f' || b.itemsize() != 4 || b.ndim() != 1 || b.shape(0) != n ||
      (n > 1 && b.strides(0) != 4))
    throw py::value_error("bias must be a contiguous float32 array of shape (N,)");
  check_aligned(b.data(), 4, "bias");
  return static_cast<const float*>(b.data());
}

// adapters: list of (A [r,k], Bp [ceil(n/16),r,16], scale, row_scale [n] f32 or None, dtype 0/1/2 of A and Bp);
// ids: int32 [m] or None
struct AdapterList {
  std::vector<pqk_lora> v;
  std::vector<py::array> keep;
  const int32_t* ids = nullptr;
  py::array ids_keep;
};

// itemsize 0: float32 only; else an array of that item size (float32 = 4, fp16/bf16 bits = 2)
py::array f32_c(const py::handle& h, std::initializer_list<int64_t> shape, const char* what, int itemsize = 0) {
  py::array a = py::reinterpret_borrow<py::array>(h);
  const bool ok_type = itemsize == 0 ? (py::isinstance<py::array>(h) && a.dtype().kind() == 'f' && a.itemsize() == 4)
                                     : (py::isinstance<py::array>(h) && a.itemsize() == itemsize);
  if (!ok_type || !(a.flags() & py::array::c_style))
    throw py::type_error(std::string(what) + " must be a C-contiguous array of the adapter's dtype");
  if ((size_t)a.ndim() != shape.size()) throw py::value_error(std::string(what) + ": wrong number of dimensions");
  py::ssize_t i = 0;
  for (const int64_t d : shape) {
    if (d >= 0 && a.shape(i) != d) throw py::value_error(std::string(what) + ": wrong shape");
    ++i;
  }
  check_aligned(a.data(), a.itemsize(), what);
  return a;
}

void adapters_of(const py::object& adapters, const py::object& ids, int64_t m, int64_t k, int64_t n, AdapterList& L) {
  if (adapters.is_none()) return;
  const py::list list = adapters.cast<py::list>();
  L.v.reserve(list.size());  // one allocation each, not one per push_back (decode calls: ~0.1 us)
  L.keep.reserve(3 * list.size());
  for (const py::handle& item : list) {
    py::tuple tup = item.cast<py::tuple>();
    if (tup.size() != 5) throw py::value_error("adapter must be (A, Bp, scale, row_scale, dtype)");
    const int dtype = tup[4].cast<int>();
    if (dtype < 0 || dtype > 2) throw py::value_error("adapter dtype must be 0 (fp32), 1 (fp16) or 2 (bf16)");
    const int isz = dtype == 0 ? 4 : 2;
    py::array A = f32_c(tup[0], {-1, k}, "A", isz);
    const int64_t r = A.shape(0);
    py::array Bt = f32_c(tup[1], {(n + 15) / 16, r, 16}, "B (16-row tiles)", isz);
    pqk_lora l{(int32_t)r, A.data(), Bt.data(), tup[2].cast<float>(), nullptr, dtype};
    L.keep.push_back(A);
    L.keep.push_back(Bt);
    if (!tup[3].is_none()) {
      py::array rs = f32_c(tup[3], {n}, "row_scale");
      l.row_scale = static_cast<const float*>(rs.data());
      L.keep.push_back(rs);
    }
    L.v.push_back(l);
  }
  if (!ids.is_none()) {
    py::array a = py::reinterpret_borrow<py::array>(ids);
    if (!py::isinstance<py::array>(ids) || a.dtype().kind() != 'i' || a.itemsize() != 4 || a.ndim() != 1 ||
        a.shape(0) != m || !(a.flags() & py::array::c_style))
      throw py::value_error("adapter ids must be a contiguous int32 array with one entry per row");
    L.ids = static_cast<const int32_t*>(a.data());
    L.ids_keep = a;
  }
}

// float32 x [m, k] on a packed weight: checks x / out / bias, converts the adapters, then calls
// f(x rows, bias, out rows, adapters) without the GIL and returns its status
template <class F>
pqk_status packed_f32_call(const Packed& w, const py::array& x, const py::object& bias, const py::array& y,
                           const py::object& adapters, const py::object& ids, F f) {
  const Rows xr = rows_of(x, "x");
  check_k(xr.k, w.k);
  const Rows yr = out_rows(y, xr.m, w.n);
  const float* bp = bias_ptr(bias, w.n);
  AdapterList L;
  adapters_of(adapters, ids, xr.m, w.k, w.n, L);
  return without_gil([&] { return f(xr, bp, yr, L); });
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "pyqkern native core (C++ kernels, runtime ISA dispatch)";

  m.def("abi_version", &pqk_abi_version);
  m.def("cpu_features", [] { return std::string(pqk_cpu_features()); });
  m.def("cpu_brand", [] { return std::string(pqk_cpu_brand()); });
  m.def("isa_names", [] {
    std::vector<std::string> v;
    for (int i = 0; i < PQK_ISA_COUNT; ++i) v.push_back(pqk_isa_name(i));
    return v;
  });
  m.def("format_names", [] {
    std::vector<std::string> v;
    for (int i = 0; i < PQK_FORMAT_COUNT; ++i) v.push_back(pqk_format_name(i));
    return v;
  });
  m.def("isa_compiled", [](int isa) { return pqk_isa_compiled(isa) == 1; });
  m.def("isa_runnable", [](int isa) { return pqk_isa_runnable(isa) == 1; });
  m.def("active_isa", [] {
    int32_t isa;
    check(pqk_active_isa(&isa));
    return isa;
  });
  auto name_of = [](int32_t v) -> py::object {
    return v < 0 ? py::object(py::none()) : py::object(py::str(pqk_isa_name(v)));
  };
  m.def("kernel_sources", [name_of](int isa) {
    // {format: (quantize isa name or None, dequantize isa name or None)}
    if (pqk_isa_runnable(isa) != 1) throw py::value_error("variant not runnable");
    py::dict d;
    for (int f = 0; f < PQK_FORMAT_COUNT; ++f)
      d[py::str(pqk_format_name(f))] = py::make_tuple(name_of(pqk_slot_variant(isa, "quantize", f)),
                                                      name_of(pqk_slot_variant(isa, "dequantize", f)));
    return d;
  });
  m.def("gemv_f32_sources", [name_of](int isa) {
    // {format: isa name of its fused compute="float" decode kernel, or None}
    if (pqk_isa_runnable(isa) != 1) throw py::value_error("variant not runnable");
    py::dict d;
    for (int f = 0; f < PQK_FORMAT_COUNT; ++f) d[py::str(pqk_format_name(f))] = name_of(pqk_slot_variant(isa, "gemv_f32", f));
    return d;
  });
  py::class_<Packed, std::shared_ptr<Packed>>(m, "Packed")
      .def_property_readonly("nbytes", [](const Packed& p) { return pqk_packed_nbytes(p.p); })
      .def_readonly("n", &Packed::n)
      .def_readonly("k", &Packed::k);

  m.def("int8_supported", [](int fmt, int64_t k, int group, int sym) {
    pqk_qparams p{group, sym};
    return pqk_int8_supported(fmt, k, &p) == 1;
  });

  m.def("pack", [](int fmt, py::buffer q, py::object s, py::object z, int64_t n, int64_t k, int group, int sym) {
    pqk_qparams p{group, sym};
    if (n <= 0) throw py::value_error("n must be positive");
    pqk_row_bytes rb = row_bytes(fmt, k, p);
    auto qi = contiguous(q, false, size_of(n, rb.q), "q");
    Sections sec(rb, n, s, z, false);
    const void* sp = sec.s; const void* zp = sec.z;
    auto out = std::make_shared<Packed>();
    out->n = n; out->k = k;
    const pqk_status st = without_gil([&] { return pqk_pack(fmt, qi.ptr, sp, zp, n, k, &p, &out->p); });
    check(st);
    return out;
  });

  m.def("matmul_int8", [](int isa, const Packed& w, py::array x, py::object bias, py::array y, py::object adapters,
                          py::object ids) {
    check(packed_f32_call(w, x, bias, y, adapters, ids, [&](const Rows& xr, const float* bp, const Rows& yr,
                                                             const AdapterList& L) {
      return pqk_matmul_int8_lora(isa, w.p, xr.p, xr.m, xr.ld, bp, const_cast<float*>(yr.p), yr.ld, L.v.data(),
                                  (int32_t)L.v.size(), L.ids);
    }));
  }, py::arg("isa"), py::arg("w"), py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("adapters") = py::none(),
     py::arg("ids") = py::none());

  // bf16 activations (uint16 bits, C-contiguous [m, k]), compute="float" on a packed weight:
  // True when done, False when the kernel does not take this case (the caller widens x instead).
  m.def("matmul_float_bf16", [](int isa, const Packed& w, py::array x, py::object bias, py::array y,
                                py::object adapters, py::object ids) {
    if (x.itemsize() != 2 || x.ndim() != 2 || !(x.flags() & py::array::c_style))
      throw py::type_error("x must be a C-contiguous 2-D array of bf16 bits (uint16)");
    check_aligned(x.data(), 2, "x");
    check_k(x.shape(1), w.k);
    Rows yr = out_rows(y, x.shape(0), w.n);
    const float* bp = bias_ptr(bias, w.n);
    AdapterList L;
    adapters_of(adapters, ids, x.shape(0), w.k, w.n, L);
    const uint16_t* xp = static_cast<const uint16_t*>(x.data());
    const int64_t m = x.shape(0);
    const pqk_status st = without_gil([&] {
      return pqk_matmul_float_bf16(isa, w.p, xp, m, w.k, bp, const_cast<float*>(yr.p), yr.ld, L.v.data(),
                                   (int32_t)L.v.size(), L.ids);
    });
    if (st == PQK_ERR_UNSUPPORTED) return false;
    check(st);
    return true;
  }, py::arg("isa"), py::arg("w"), py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("adapters") = py::none(),
     py::arg("ids") = py::none());

  // float32 activations, compute="float" on a packed weight through the same kernel (x split
  // exactly into three bf16 parts): True when done, False when it does not take the case.
  m.def("matmul_float_packed", [](int isa, const Packed& w, py::array x, py::object bias, py::array y,
                                  py::object adapters, py::object ids) {
    const pqk_status st = packed_f32_call(w, x, bias, y, adapters, ids, [&](const Rows& xr, const float* bp,
                                                                             const Rows& yr, const AdapterList& L) {
      return pqk_matmul_float_packed(isa, w.p, xr.p, xr.m, xr.ld, bp, const_cast<float*>(yr.p), yr.ld, L.v.data(),
                                     (int32_t)L.v.size(), L.ids);
    });
    if (st == PQK_ERR_UNSUPPORTED) return false;
    check(st);
    return true;
  }, py::arg("isa"), py::arg("w"), py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("adapters") = py::none(),
     py::arg("ids") = py::none());

  m.def("matmul_float", [](int isa, int fmt, py::buffer q, py::object s, py::object z, int64_t n, int64_t k, int group,
                           int sym, py::array x, py::object bias, py::array y, py::object adapters, py::object ids) {
    pqk_qparams p{group, sym};
    if (n <= 0) throw py::value_error("n must be positive");
    pqk_row_bytes rb = row_bytes(fmt, k, p);
    auto qi = contiguous(q, false, size_of(n, rb.q), "q");
    Sections sec(rb, n, s, z, false);
    const void* sp = sec.s; const void* zp = sec.z;
    Rows xr = rows_of(x, "x");
    check_k(xr.k, k);
    Rows yr = out_rows(y, xr.m, n);
    const float* bp = bias_ptr(bias, n);
    AdapterList L;
    adapters_of(adapters, ids, xr.m, k, n, L);
    const pqk_status st = without_gil([&] {
      return pqk_matmul_float_lora(isa, fmt, qi.ptr, sp, zp, n, k, &p, xr.p, xr.m, xr.ld, bp,
                                   const_cast<float*>(yr.p), yr.ld, L.v.data(), (int32_t)L.v.size(), L.ids);
    });
    check(st);
  }, py::arg("isa"), py::arg("fmt"), py::arg("q"), py::arg("s"), py::arg("z"), py::arg("n"), py::arg("k"),
     py::arg("group"), py::arg("sym"), py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("adapters") = py::none(),
     py::arg("ids") = py::none());

  m.def("matmul_sources", [name_of](int isa) {
    if (pqk_isa_runnable(isa) != 1) throw py::value_error("variant not runnable");
    py::dict d;
    for (const char* slot : {"quantize_act", "gemm_int8", "gemm_f32", "gemm_f32_xt", "lora_shrink", "lora_expand", "gemv_bf16",
                             "gemv_f32p", "all_finite", "int8_peak", "fma_peak"})
      d[slot] = name_of(pqk_slot_variant(isa, slot, 0));
    return d;
  });
  // both wait for the pool's lock, which a running parallel step holds: without the GIL, so other
  // Python threads run meanwhile
  m.def("set_num_threads", [](int n) {
    const pqk_status st = without_gil([&] { return pqk_set_num_threads(n); });
    check(st);
  });
  m.attr("MAX_THREADS") = PQK_MAX_THREADS;
  m.def("get_num_threads", []() {
    return without_gil([] { return pqk_get_num_threads(); });
  });
  m.def("fma_peak", [](int isa, int reps) {
    double gflops = 0.0;
    const pqk_status st = without_gil([&] { return pqk_fma_peak(isa, reps, &gflops); });
    check(st);
    return gflops;
  });
  m.def("int8_peak", [](int isa, int reps) {
    double gops = 0.0;
    const pqk_status st = without_gil([&] { return pqk_int8_peak(isa, reps, &gops); });
    check(st);
    return gops;
  });
  m.def("read_probe", [](py::array buf, int reps) {
    py::buffer_info bi = buf.request();
    if (!(buf.flags() & py::array::c_style)) throw py::value_error("read_probe: buffer must be C-contiguous");
    double best = 0.0;
    uint64_t sum = 0;
    const int64_t nbytes = (int64_t)(bi.size * bi.itemsize);
    const pqk_status st = without_gil([&] { return pqk_read_probe(bi.ptr, nbytes, reps, &best, &sum); });
    check(st);
    return py::make_tuple(best, sum);
  });

  m.def("row_bytes", [](int fmt, int64_t k, int group, int sym) {
    pqk_qparams p{group, sym};
    pqk_row_bytes rb = row_bytes(fmt, k, p);
    return py::make_tuple(rb.q, rb.s, rb.z, p.group);
  });

  // x: float32 2-D array; rows may be strided (row stride multiple of 4 bytes), columns contiguous.
  m.def("quantize", [](int isa, int fmt, py::array x, int group, int sym, py::buffer q, py::object s, py::object z) {
    if (!py::isinstance<py::array_t<float>>(x) || x.dtype().kind() != 'f' || x.itemsize() != 4)
      throw py::type_error("x must be a float32 array");
    if (x.ndim() != 2) throw py::value_error("x must be 2-D");
    const int64_t n = x.shape(0), k = x.shape(1);
    if (k > 1 && x.strides(1) != 4) throw py::value_error("x rows must be contiguous");
    if (n > 1 && (x.strides(0) % 4 != 0 || x.strides(0) < 4 * k)) throw py::value_error("bad row stride");
    const int64_t ldx = n > 1 ? x.strides(0) / 4 : k;
    check_aligned(x.data(), 4, "x");
    pqk_qparams p{group, sym};
    pqk_row_bytes rb = row_bytes(fmt, k, p);
    auto qi = contiguous(q, true, size_of(n, rb.q), "q");
    Sections sec(rb, n, s, z, true);
    void* sp = sec.s; void* zp = sec.z;
    const float* xp = static_cast<const float*>(x.data());
    const pqk_status st = without_gil([&] { return pqk_quantize(isa, fmt, xp, n, k, ldx, &p, qi.ptr, sp, zp); });
    check(st);
  }, py::arg("isa"), py::arg("fmt"), py::arg("x"), py::arg("group"), py::arg("sym"), py::arg("q"), py::arg("s"), py::arg("z"));

  m.def("dequantize", [](int isa, int fmt, py::buffer q, py::object s, py::object z, int64_t n, int64_t k, int group,
                         int sym, py::buffer y) {
    pqk_qparams p{group, sym};
    if (n < 0) throw py::value_error("n < 0");
    pqk_row_bytes rb = row_bytes(fmt, k, p);
    auto qi = contiguous(q, false, size_of(n, rb.q), "q");
    auto yi = contiguous(y, true, size_of(n, k, 4), "y");
    if (yi.format != py::format_descriptor<float>::format()) throw py::type_error("y must be float32");
    check_aligned(yi.ptr, 4, "y");
    Sections sec(rb, n, s, z, false);
    const void* sp = sec.s; const void* zp = sec.z;
    float* yp = static_cast<float*>(yi.ptr);
    const pqk_status st = without_gil([&] { return pqk_dequantize(isa, fmt, qi.ptr, sp, zp, n, k, &p, yp); });
    check(st);
  }, py::arg("isa"), py::arg("fmt"), py::arg("q"), py::arg("s"), py::arg("z"), py::arg("n"), py::arg("k"),
     py::arg("group"), py::arg("sym"), py::arg("y"));
}
