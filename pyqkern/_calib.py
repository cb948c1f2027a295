"""Calibration activations for ``pyqkern quantize --gptq --calib FILE``.

A source answers, per weight name, "is there calibration data for this [N, K] weight?" and feeds
that data into a :class:`pyqkern.gptq.GPTQ` object in row chunks of at most :data:`CHUNK_ROWS`
tokens (the Hessian is accumulated for one tensor at a time; no source holds more than one chunk
of activations in memory, except the .npz members that are compressed with Fortran order).

* ``.npz``: arrays keyed by tensor name (the weight's name, or the name without ``.weight``),
  each [tokens, K] (leading dimensions are flattened).
* ``.npy``: one [tokens, K] array, used for every weight with that K (its Hessian is computed once
  per K and shared).
* ``.txt``: one text per line; the input must be a Hugging Face model directory and
  ``transformers`` installed. The model is loaded offline in fp32 (``AutoModel``), each line is
  tokenized and run through it, and forward pre-hooks on every ``torch.nn.Linear`` write the
  module's inputs to a spill file per weight (in a temporary directory next to the output, so
  that the activations do not sit in memory); module names are matched to the checkpoint's
  weight names by suffix (``encoder.layer.0.attention.self.query`` ->
  ``bert.encoder.layer.0.attention.self.query.weight``).

Every problem (missing file, wrong K, non-finite values, non-float data, a model that cannot be
loaded) raises ValueError naming the file and the tensor.
"""
from __future__ import annotations

import os
import tempfile
import zipfile

import numpy as np

__all__ = ["open_source", "CHUNK_ROWS", "match_modules"]

#: activations are fed to GPTQ.add_batch in chunks of at most this many rows (tokens)
CHUNK_ROWS = 8192


def _read_exact(fp, mv, where):
    got = 0
    while got < len(mv):
        r = fp.readinto(mv[got:])
        if not r:
            raise ValueError(f"{where}: data ends after {got} of {len(mv)} bytes")
        got += r


def _npy_header(fp, where):
    """(shape, fortran_order, dtype) of the .npy stream at fp's position; fp is left at the data."""
    fmt = np.lib.format
    try:
        major, _ = fmt.read_magic(fp)
        if major == 1:
            shape, fortran, dtype = fmt.read_array_header_1_0(fp)
        elif major in (2, 3):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy version {major}")
    except ValueError as e:
        raise ValueError(f"{where}: not a valid .npy array: {e}") from None
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _check_array(shape, dtype, where, k=None):
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise ValueError(f"{where}: calibration activations must be float16/32/64, got dtype {dtype}")
    if len(shape) < 2:
        raise ValueError(f"{where}: calibration activations must be [tokens, K], got shape {list(shape)}")
    if k is not None and shape[-1] != k:
        raise ValueError(f"{where}: calibration activations have K={shape[-1]} (shape {list(shape)}) but the "
                         f"weight has K={k} inputs")
    if int(np.prod(shape[:-1])) == 0 or shape[-1] == 0:
        raise ValueError(f"{where}: calibration activations are empty (shape {list(shape)})")


def _row_chunks(fp, shape, fortran, dtype, where):
    """Yield float64-ready [rows, K] chunks (at most CHUNK_ROWS rows) from fp (positioned at the data)."""
    k = shape[-1]
    rows = int(np.prod(shape[:-1]))
    if fortran and len(shape) > 1:  # column-major: rows are not contiguous; read the whole array
        # in bounded pieces, so memory follows the bytes really there, not the header's claim
        need, got, parts = rows * k * dtype.itemsize, 0, []
        while got < need:
            b = fp.read(min(need - got, 1 << 24))
            if not b:
                raise ValueError(f"{where}: data ends after {got} of {need} bytes")
            parts.append(b)
            got += len(b)
        buf = np.frombuffer(b"".join(parts), np.uint8)
        del parts
        a = buf.view(dtype).reshape(shape, order="F").reshape(rows, k)
        for r0 in range(0, rows, CHUNK_ROWS):
            yield _finite(np.ascontiguousarray(a[r0:r0 + CHUNK_ROWS]), where)
        return
    step = max(1, min(CHUNK_ROWS, rows))
    buf = np.empty(step * k * dtype.itemsize, np.uint8)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        mv = memoryview(buf)[:n * k * dtype.itemsize]
        _read_exact(fp, mv, where)
        yield _finite(buf[:len(mv)].view(dtype).reshape(n, k), where)


def _finite(a, where):
    if not np.isfinite(a).all():
        bad = int(np.argmax(~np.isfinite(a).all(axis=1)))
        raise ValueError(f"{where}: calibration activations contain NaN or Inf (row {bad} of a chunk)")
    return a


class _NpzSource:
    def __init__(self, path):
        self.path = path
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{path}: not a readable .npz file: {e}") from None
        self.arrays = {}
        for info in self.zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            with self.zf.open(info) as fp:
                shape, fortran, dtype = _npy_header(fp, f"{path}[{key}]")
            self.arrays[key] = (info, shape, fortran, dtype)
        if not self.arrays:
            raise ValueError(f"{path}: the .npz file holds no arrays")
        self.used = set()
        self.describe = f"{path} (.npz, {len(self.arrays)} arrays keyed by tensor name)"

    def _key(self, name):
        if name in self.arrays:
            return name
        if name.endswith(".weight") and name[:-7] in self.arrays:
            return name[:-7]
        return None

    def prepare(self, targets, warn):
        """targets: {weight name: (N, K)} to be quantized. Checks shapes; returns the names with data."""
        have = set()
        for name, (_, k) in targets.items():
            key = self._key(name)
            if key is None:
                continue
            _, shape, _, dtype = self.arrays[key]
            _check_array(shape, dtype, f"{self.path}[{key}] (for tensor {name!r})", k)
            self.used.add(key)
            have.add(name)
        unused = sorted(set(self.arrays) - self.used)
        if unused:
            warn(f"warning: {len(unused)} calibration array(s) in {self.path} match no tensor being quantized: "
                 + ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))
        return have

    def feed(self, name, g):
        key = self._key(name)
        info, shape, fortran, dtype = self.arrays[key]
        where = f"{self.path}[{key}]"
        with self.zf.open(info) as fp:
            _npy_header(fp, where)
            for x in _row_chunks(fp, shape, fortran, dtype, where):
                g.add_batch(x)

    def close(self):
        self.zf.close()


class _NpySource:
    def __init__(self, path):
        self.path = path
        with open(path, "rb") as fp:
            self.shape, self.fortran, self.dtype = _npy_header(fp, path)
        _check_array(self.shape, self.dtype, path)
        self.k = self.shape[-1]
        self._hessian = None
        self.describe = f"{path} (.npy, {int(np.prod(self.shape[:-1]))} tokens x K={self.k})"

    def prepare(self, targets, warn):
        have = {n for n, (_, k) in targets.items() if k == self.k}
        if targets and not have:
            ks = sorted({k for _, k in targets.values()})
            raise ValueError(f"{self.path}: calibration activations have K={self.k} but no tensor being quantized "
                             f"has K={self.k} inputs (their K: {', '.join(map(str, ks[:10]))})")
        return have

    def feed(self, name, g):
        if self._hessian is None:  # one Hessian for every weight with this K
            from .gptq import GPTQ

            acc = GPTQ(np.zeros((1, self.k), np.float32))
            with open(self.path, "rb") as fp:
                _npy_header(fp, self.path)
                for x in _row_chunks(fp, self.shape, self.fortran, self.dtype, self.path):
                    acc.add_batch(x)
            self._hessian = (acc.H, acc.nsamples)
        g.set_hessian(*self._hessian)

    def close(self):
        self._hessian = None


def match_modules(modules, weights):
    """Map module names to weight names. modules: {module name: weight shape}; weights: {weight
    name: shape}. A module ``m`` matches ``m.weight``, else a unique weight ending in ``.m.weight``;
    if none, leading components of ``m`` are dropped one by one and the match retried (the module
    tree may carry a prefix the checkpoint lacks, or the reverse). Shapes must agree. Returns
    ({module: weight}, [module names with no or an ambiguous match])."""
    out, taken, missed = {}, set(), []
    for m, shape in modules.items():
        parts, found = m.split("."), None
        for i in range(len(parts)):
            sub = ".".join(parts[i:])
            cands = [w for w in weights if w == sub + ".weight" or w.endswith("." + sub + ".weight")]
            if cands:
                found = cands[0] if len(cands) == 1 else None
                break
        if found is None or tuple(weights[found]) != tuple(shape) or found in taken:
            missed.append(m)
            continue
        out[m] = found
        taken.add(found)
    return out, missed


class _TextSource:
    def __init__(self, path, model_dir, spill_dir, max_length=512):
        self.path, self.model_dir, self.spill_dir, self.max_length = path, model_dir, spill_dir, int(max_length)
        if not (os.path.isdir(model_dir) and os.path.isfile(os.path.join(model_dir, "config.json"))):
            raise ValueError(f"{path}: text calibration runs the model, so the input must be a Hugging Face model "
                             f"directory (config.json + *.safetensors); {model_dir} is not one "
                             "(give activations as .npz or .npy instead)")
        if self.max_length <= 0:
            raise ValueError(f"calibration max length must be positive, got {max_length}")
        with open(path, encoding="utf-8") as f:
            try:
                self.lines = [ln.strip() for ln in f if ln.strip()]
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not self.lines:
            raise ValueError(f"{path}: no text lines to calibrate with")
        self.files = {}  # weight name -> (spill file, tokens, K)
        self._tmp = None
        self.describe = f"{path} (.txt, {len(self.lines)} lines through {model_dir})"

    def prepare(self, targets, warn):
        try:
            import torch
            import transformers
        except ImportError as e:
            raise ValueError(f"{self.path}: text calibration needs torch and transformers installed ({e})") from None
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # no load report (heads missing/unused) on the console
        try:
            tok = transformers.AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            model = transformers.AutoModel.from_pretrained(self.model_dir, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for a bad directory
            raise ValueError(f"{self.model_dir}: cannot load the model/tokenizer for text calibration offline: "
                             f"{type(e).__name__}: {e}") from None
        finally:
            transformers.logging.set_verbosity(verbosity)
        model = model.float().eval()
        linears = {m: tuple(mod.weight.shape) for m, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear)}
        mapping, missed = match_modules(linears, {n: s for n, s in targets.items()})
        if missed:
            warn(f"warning: {len(missed)} Linear module(s) of the model match no tensor being quantized "
                 f"(not captured): " + ", ".join(missed[:6]) + (" ..." if len(missed) > 6 else ""))
        if not mapping:
            raise ValueError(f"{self.model_dir}: no Linear module of the model matches a tensor being quantized")
        self._tmp = tempfile.TemporaryDirectory(prefix=".pyqkern-calib-", dir=self.spill_dir)
        counts, paths = {}, {}
        for i, m in enumerate(sorted(mapping)):
            paths[m] = os.path.join(self._tmp.name, f"{i}.f32")
            counts[m] = 0
        handles = []

        def hook(name):
            def pre(mod, args):
                x = args[0] if args else None
                if not isinstance(x, torch.Tensor):
                    return
                a = x.detach().reshape(-1, x.shape[-1]).to(torch.float32).cpu().numpy()
                with open(paths[name], "ab") as f:
                    f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
                counts[name] += a.shape[0]
            return pre

        mods = dict(model.named_modules())
        for m in mapping:
            handles.append(mods[m].register_forward_pre_hook(hook(m)))
        import inspect

        accepted = set(inspect.signature(model.forward).parameters)
        try:
            with torch.inference_mode():
                for line in self.lines:
                    enc = tok(line, return_tensors="pt", truncation=True, max_length=self.max_length)
                    model(**{k: v for k, v in enc.items() if k in accepted})
        except Exception as e:
            raise ValueError(f"{self.path}: running the model on the calibration text failed: "
                             f"{type(e).__name__}: {e}") from None
        finally:
            for h in handles:
                h.remove()
        for m, w in mapping.items():
            if counts[m]:
                self.files[w] = (paths[m], counts[m], linears[m][1])
        del model
        return set(self.files)

    def feed(self, name, g):
        path, rows, k = self.files[name]
        where = f"{self.path} (activations of {name!r})"
        with open(path, "rb") as fp:
            for x in _row_chunks(fp, (rows, k), False, np.dtype(np.float32), where):
                g.add_batch(x)

    def close(self):
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def open_source(calib, model_input, spill_dir, max_length=512):
    """A calibration source for ``calib`` (.npz, .npy or .txt). model_input: the quantize input
    (a .txt source needs a model directory); spill_dir: where .txt activations are spilled."""
    calib = os.fspath(calib)
    if not os.path.isfile(calib):  # a directory or a FIFO exists but is no file to read (a review)
        why = "not a regular file" if os.path.exists(calib) else "no such file"
        raise ValueError(f"calibration file {calib}: {why}")
    ext = os.path.splitext(calib)[1].lower()
    if ext == ".npz":
        return _NpzSource(calib)
    if ext == ".npy":
        return _NpySource(calib)
    if ext == ".txt":
        return _TextSource(calib, model_input, spill_dir, max_length)
    raise ValueError(f"calibration file {calib}: must be .npz (activations by tensor name), .npy (one [tokens, K] "
                     "array) or .txt (text lines, with a Hugging Face model directory as input)")
