"""llama.cpp's ggml as a matmul peer for the benchmarks, built from a source distribution.

The ggml sources come from the ``llama-cpp-python`` sdist on PyPI (it vendors llama.cpp), are
built once with CMake into a cache directory (~20-40 s on 2 cores) and called through ctypes:
the weight goes into the CPU backend's ``CPU_REPACK`` buffer where ggml has an interleaved
kernel for its type on this CPU (q4_0 -> q4_0_8x8 with AVX2 / AVX-512; q8_0 only on Arm), as
llama.cpp's model loader does, else into a plain CPU buffer; ``ggml_mul_mat`` with float32
activations then runs ggml's int8 kernels (activations quantized to q8_0 on the fly).

ggml is built with ``GGML_NATIVE=ON`` (``-march=native``): the peer at its best on this machine,
as llama.cpp users build it. Nothing of it is vendored here; if anything fails (no network to
PyPI, no compiler, an API change) ``load()`` raises ``GgmlUnavailable`` with the reason and the
benchmark rows are skipped with it.

Environment: ``PYQKERN_GGML_LIB_DIR`` = a directory holding an already built libggml-base /
libggml-cpu (skips the download and build); ``PYQKERN_GGML_CACHE`` = where to build (default
~/.cache/pyqkern-bench); ``PYQKERN_BENCH_NO_GGML=1`` = do not try.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

SDIST = ("llama-cpp-python", "0.3.36")   # pinned: the ctypes calls below follow its ggml API
GGML_TYPES = {"q4_0": 2, "q8_0": 8, "q4_k": 12, "q6_k": 14}  # enum ggml_type
GGML_F32, GGML_BF16 = 0, 30


class GgmlUnavailable(RuntimeError):
    pass


def _run(cmd, log, timeout):
    """cmd in its own process group, all of which is killed on timeout (a build tool's children
    must not go on compiling while the benchmarks run)."""
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(map(str, cmd)) + "\n").encode())
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise GgmlUnavailable(f"{cmd[0]} {cmd[1]} timed out after {timeout} s; see {log}") from None
    if rc != 0:
        raise GgmlUnavailable(f"{cmd[0]} {cmd[1]} failed (rc {rc}); see {log}")


def _fetch_sdist(dest: Path) -> Path:
    """The sdist through PyPI's simple index (PEP 691 JSON, what pip reads), sha256-checked."""
    name, version = SDIST
    fname = f"{name.replace('-', '_')}-{version}.tar.gz"
    index = f"https://pypi.org/simple/{name}/"
    req = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    hit = [f for f in files if f["filename"] == fname]
    if not hit:
        raise GgmlUnavailable(f"{fname} not in {index}")
    url, sha = urllib.parse.urljoin(index, hit[0]["url"]), hit[0]["hashes"]["sha256"]
    out = dest / fname
    if not out.exists():
        tmp = out.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        tmp.rename(out)
    if hashlib.sha256(out.read_bytes()).hexdigest() != sha:
        out.unlink()
        raise GgmlUnavailable(f"sha256 mismatch for {fname}")
    return out


LIBS = ("libggml-base.so", "libggml-cpu.so", "libggml.so")

# CMake options per build flavor: "native" is llama.cpp at its best on this machine; "avx2" and
# "avxvnni" are what a CPU without AVX-512 runs (most laptops; AVX-VNNI from Intel's 12th
# generation on), for comparison with pyqkern's variants of the same names (pq.matmul(isa=...)).
_X86_256 = ["-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
            "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF",
            "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_BF16=OFF"]
FLAVORS = {"native": ["-DGGML_NATIVE=ON"], "avx2": _X86_256 + ["-DGGML_AVX_VNNI=OFF"],
           "avxvnni": _X86_256 + ["-DGGML_AVX_VNNI=ON"]}


def _build(cache: Path, flavor: str = "native") -> Path:
    """Download, extract ggml, build; returns the directory with the shared libraries. A failed
    build leaves no build directory behind (the next run configures afresh)."""
    name, version = SDIST
    root = cache / f"ggml-{name}-{version}"
    build = root / ("build" if flavor == "native" else f"build-{flavor}")
    libdir = build / "ggml" / "src"
    if all((libdir / nm).exists() for nm in LIBS):
        return libdir
    try:
        _build_in(root, build, libdir, FLAVORS[flavor])
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return libdir


def _build_in(root: Path, build: Path, libdir: Path, options: list):
    name, version = SDIST
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    tgz = _fetch_sdist(root)
    prefix = f"{name.replace('-', '_')}-{version}/vendor/llama.cpp/ggml/"
    with tarfile.open(tgz) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise GgmlUnavailable(f"{tgz.name} holds no {prefix}")
        if hasattr(tarfile, "data_filter"):
            tf.extractall(root / "src", members=members, filter="data")
        else:  # Python without extraction filters: plain files and directories, no escaping paths
            for m in members:
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise GgmlUnavailable(f"unexpected member {m.name!r} in {tgz.name}")
            tf.extractall(root / "src", members=members)
    # ggml as a sub-project: its standalone mode wants tests/, examples/ and ggml.pc.in, which the
    # sdist does not ship
    wrap = root / "wrap"
    wrap.mkdir(exist_ok=True)
    (wrap / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.14)\nproject(ggml_peer C CXX)\n"
        f"add_subdirectory(\"{(root / 'src' / prefix).as_posix()}\" ggml)\n")
    cmake = shutil.which("cmake")
    if not cmake:
        raise GgmlUnavailable("cmake not found")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run([cmake, "-S", str(wrap), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release", *options,
          "-DBUILD_SHARED_LIBS=ON", "-DGGML_BACKEND_DL=OFF"], log, 300)
    _run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)], log, 1800)
    missing = [nm for nm in LIBS if not (libdir / nm).exists()]
    if missing:
        raise GgmlUnavailable(f"build finished without {missing}; see {log}")


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class Ggml:
    """The few ggml / ggml-backend calls a repacked mul_mat needs."""

    def __init__(self, libdir: Path):
        P, I64, SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
        libs = [ctypes.CDLL(str(libdir / nm), mode=ctypes.RTLD_GLOBAL) for nm in LIBS]
        base, cpu = libs[0], libs[1]

        def f(lib, name, res, args):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
            return fn

        self.init = f(base, "ggml_init", P, [_InitParams])
        self.free = f(base, "ggml_free", None, [P])
        self.new_2d = f(base, "ggml_new_tensor_2d", P, [P, ctypes.c_int, I64, I64])
        self.mul_mat = f(base, "ggml_mul_mat", P, [P, P, P])
        self.add = f(base, "ggml_add", P, [P, P, P])
        self.scale = f(base, "ggml_scale", P, [P, P, ctypes.c_float])
        self.new_graph = f(base, "ggml_new_graph", P, [P])
        self.expand = f(base, "ggml_build_forward_expand", None, [P, P])
        self.nbytes = f(base, "ggml_nbytes", SZ, [P])
        self.tensor_set = f(base, "ggml_backend_tensor_set", None, [P, P, SZ, SZ])
        self.tensor_get = f(base, "ggml_backend_tensor_get", None, [P, P, SZ, SZ])
        self.alloc_buft = f(base, "ggml_backend_alloc_ctx_tensors_from_buft", P, [P, P])
        self.alloc_backend = f(base, "ggml_backend_alloc_ctx_tensors", P, [P, P])
        self.buffer_free = f(base, "ggml_backend_buffer_free", None, [P])
        self.buft_name = f(base, "ggml_backend_buft_name", ctypes.c_char_p, [P])
        self.compute = f(base, "ggml_backend_graph_compute", ctypes.c_int, [P, P])
        self.backend_free = f(base, "ggml_backend_free", None, [P])
        self.cpu_init = f(cpu, "ggml_backend_cpu_init", P, [])
        self.set_threads = f(cpu, "ggml_backend_cpu_set_n_threads", None, [P, ctypes.c_int])
        reg = f(cpu, "ggml_backend_cpu_reg", P, [])()
        dev = f(base, "ggml_backend_reg_dev_get", P, [P, SZ])(reg, 0)
        addr = f(base, "ggml_backend_reg_get_proc_address", P, [P, ctypes.c_char_p])(
            reg, b"ggml_backend_dev_get_extra_bufts")
        self.supports_op = f(base, "ggml_backend_dev_supports_op", ctypes.c_bool, [P, P])
        self.dev = dev
        self.repack_buft = None
        if addr:
            lst = ctypes.CFUNCTYPE(ctypes.POINTER(P), P)(addr)(dev)
            i = 0
            while lst and lst[i]:
                if self.buft_name(lst[i]) == b"CPU_REPACK":
                    self.repack_buft = lst[i]
                i += 1
        if self.repack_buft is None:
            raise GgmlUnavailable("this ggml build has no CPU_REPACK buffer type")


class MatMul:
    """y[M, N] = x[M, K] @ W.T with W in ggml block bytes (row-major [N, K/32 blocks]), in the
    CPU_REPACK buffer where ggml has a repacked kernel for the type on this CPU (q4_0 on AVX2 /
    AVX-512: q4_0_8x8), else in a plain CPU buffer, as llama.cpp's model loader decides.

    lora=(A [r, K], B [N, r], scale, "f32" | "bf16") adds scale * (x @ A.T) @ B.T as llama.cpp
    applies an adapter: two more mul_mat, a scale and an add in the graph (llm_graph build_lora_mm),
    A and B in a plain CPU buffer in that type."""

    def __init__(self, gg: Ggml, fmt: str, raw: np.ndarray, n: int, k: int, m: int, lora=None):
        self.gg = gg
        self.be = self.cw = self.cx = self.ca = self.bw = self.bx = self.ba = None
        try:
            self._build(fmt, raw, n, k, m, lora)
        except BaseException:
            self.close()
            raise

    def _build(self, fmt, raw, n, k, m, lora):
        gg = self.gg
        self.be = gg.cpu_init()
        raw = np.ascontiguousarray(raw).view(np.uint8)
        # probe as llama.cpp does: a mul_mat whose weight sits in a CPU_REPACK buffer, asked of the
        # device (the repack buffer's set_tensor assumes a repacked kernel exists)
        probe = gg.init(_InitParams(1 << 20, None, True))
        pw = gg.new_2d(probe, GGML_TYPES[fmt], k, n)
        pb = gg.alloc_buft(probe, gg.repack_buft)
        self.repacked = bool(pb) and gg.supports_op(gg.dev, gg.mul_mat(probe, pw, gg.new_2d(probe, GGML_F32, k, m)))
        if pb:
            gg.buffer_free(pb)
        gg.free(probe)
        self.cw = gg.init(_InitParams(1 << 20, None, True))
        self.W = gg.new_2d(self.cw, GGML_TYPES[fmt], k, n)
        if gg.nbytes(self.W) != raw.nbytes:
            raise GgmlUnavailable(f"ggml's {fmt} [{n}, {k}] is {gg.nbytes(self.W)} bytes, ours {raw.nbytes}")
        self.bw = gg.alloc_buft(self.cw, gg.repack_buft) if self.repacked else gg.alloc_backend(self.cw, self.be)
        gg.tensor_set(self.W, raw.ctypes.data, 0, raw.nbytes)           # repacks here
        self.cx = gg.init(_InitParams(1 << 20, None, True))
        self.X = gg.new_2d(self.cx, GGML_F32, k, m)
        self.Y = gg.mul_mat(self.cx, self.W, self.X)
        self.adapter_bytes = 0
        if lora is not None:
            A, B, scale, dtype = lora
            r = A.shape[0]
            gt = {"f32": GGML_F32, "bf16": GGML_BF16}[dtype]
            self.ca = gg.init(_InitParams(1 << 20, None, True))
            ta, tb = gg.new_2d(self.ca, gt, k, r), gg.new_2d(self.ca, gt, r, n)
            self.ba = gg.alloc_backend(self.ca, self.be)
            for t, arr in ((ta, A), (tb, B)):
                arr = np.ascontiguousarray(arr, dtype=np.float32)
                if dtype == "bf16":   # round to nearest even, as ggml's fp32 -> bf16
                    u = arr.view(np.uint32)
                    arr = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
                gg.tensor_set(t, arr.ctypes.data, 0, arr.nbytes)
                self.adapter_bytes += arr.nbytes
            low = gg.mul_mat(self.cx, tb, gg.mul_mat(self.cx, ta, self.X))
            self.Y = gg.add(self.cx, self.Y, gg.scale(self.cx, low, float(scale)))
        self.graph = gg.new_graph(self.cx)
        gg.expand(self.graph, self.Y)
        self.bx = gg.alloc_backend(self.cx, self.be)
        self.m, self.n, self.k = m, n, k
        self.weight_bytes = raw.nbytes

    def set_x(self, x: np.ndarray):
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.gg.tensor_set(self.X, x.ctypes.data, 0, x.nbytes)

    def run(self, threads: int):
        self.gg.set_threads(self.be, threads)
        if self.gg.compute(self.be, self.graph) != 0:
            raise RuntimeError("ggml_backend_graph_compute failed")

    def result(self) -> np.ndarray:
        y = np.empty((self.m, self.n), np.float32)
        self.gg.tensor_get(self.Y, y.ctypes.data, 0, y.nbytes)
        return y

    def close(self):
        """Frees everything; safe to call twice and on a half-built object."""
        gg = self.gg
        for nm in ("bx", "bw", "ba"):
            if getattr(self, nm):
                gg.buffer_free(getattr(self, nm))
                setattr(self, nm, None)
        for nm in ("cx", "cw", "ca"):
            if getattr(self, nm):
                gg.free(getattr(self, nm))
                setattr(self, nm, None)
        if self.be:
            gg.backend_free(self.be)
            self.be = None


_LOADED: dict = {}


def load(flavor: str = "native") -> Ggml:
    """The ggml peer of that build flavor (FLAVORS), built if needed (cached for the process);
    GgmlUnavailable with the reason. One flavor per process: the builds' libraries share their
    names and exported symbols, so a second one loaded beside the first could run the first's
    code (bench/isa_peer.py runs each flavor in a process of its own)."""
    if flavor in _LOADED:
        if isinstance(_LOADED[flavor], Exception):
            raise _LOADED[flavor]
        return _LOADED[flavor]
    other = [f for f, v in _LOADED.items() if not isinstance(v, Exception)]
    if other:
        raise GgmlUnavailable(f"ggml's {other[0]} build is loaded in this process; run the {flavor} build in "
                              "another process")
    try:
        if os.environ.get("PYQKERN_BENCH_NO_GGML", "") not in ("", "0"):
            raise GgmlUnavailable("PYQKERN_BENCH_NO_GGML is set")
        libdir = os.environ.get("PYQKERN_GGML_LIB_DIR") if flavor == "native" else None
        if libdir:
            lib = Path(libdir)
        else:
            cache = Path(os.environ.get("PYQKERN_GGML_CACHE", Path.home() / ".cache" / "pyqkern-bench"))
            lib = _build(cache, flavor)
        gg = Ggml(lib)
    except GgmlUnavailable as e:
        _LOADED[flavor] = e
        raise
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, AttributeError, TypeError,
            tarfile.TarError) as e:   # AttributeError: a symbol this ggml does not export
        err = GgmlUnavailable(f"{type(e).__name__}: {e}")
        _LOADED[flavor] = err
        raise err from e
    _LOADED[flavor] = gg
    return gg
