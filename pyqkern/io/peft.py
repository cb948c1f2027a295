"""Read and write LoRA / DoRA adapters in Hugging Face PEFT's on-disk layout.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are

    base_model.model.<module>.lora_A.weight        [r, in]
    base_model.model.<module>.lora_B.weight        [out, r]
    base_model.model.<module>.lora_magnitude_vector [out]      (DoRA; ".weight" also accepted)

<module> is the module's name inside the base model (e.g. ``model.layers.0.self_attn.q_proj``).
Scaling follows ``LoraLayer.update_layer``: alpha / r, or alpha / sqrt(r) with ``use_rslora``, with
per-module r and alpha from ``rank_pattern`` / ``alpha_pattern`` resolved as PEFT's
``get_pattern_key`` does: the first key (in file order) for which ``re.match(r"(.*\\.)?(KEY)$", module)``
matches wins; the key is a regular expression, so a plain name matches itself or any dotted suffix.

Not supported (ValueError): ``lora_bias`` (``lora_B.bias``), QA-LoRA,
and the variants PEFT computes differently from x @ A.T @ B.T on the base weight (aLoRA, KaSA,
BD-LoRA, layer replication, adapters on parameters, and PiSSA / OLoRA / CorDA files saved without
PEFT's conversion, whose base weight PEFT replaces by a residual on load). Keys that are not Linear
LoRA weights (``lora_embedding_*``, conv adapters, ``modules_to_save`` copies, trained biases of
``bias="all"`` / ``"lora_only"``, ...) are skipped with a UserWarning. ``fan_in_fan_out`` needs
nothing: A and B are stored the same way and B @ A is [out, in], which is pyqkern's [N, K] weight
orientation.
"""
from __future__ import annotations

import functools
import json
import os
import re
import warnings
from collections import Counter

import numpy as np

from .._lora import LoRA, _colocate
from . import safetensors as _st
from ._convert_common import finite_number, integral, json_object

__all__ = ["load_peft_adapter", "save_peft_adapter", "get_pattern_key", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m",
             ".lora_magnitude_vector.weight": "m", ".lora_B.bias": "bias"}


try:  # the regular-expression parser behind re (Python 3.11 moved it)
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_parse as _sre_parse

_MAX_NAME = 1000  # characters of a module name a pattern key is matched against


_SPAN_UNBOUNDED = 16  # a repetition whose count may vary by this much or more counts as unbounded


def _backtracking_risk(tree, outer=False):
    """(why, unbounded, paths): why matching this parsed pattern could take exponential time (a
    repetition (more than once) or alternatives inside a repetition, a back-reference) or None;
    the number of unbounded repetitions (or with a count varying by 16 or more, like {0,999}: each
    multiplies the worst case by up to the name's length); and the ways to match the rest, each a
    path a failing match retries: alternatives add their paths, items in sequence multiply them,
    an optional item or a short variable count ({0,3}) multiplies by its choices (a review: 32
    (?:.|.) in a row, or 24 \\.? before 24 \\., passed the first two counts and took minutes)."""
    unbounded, paths = 0, 1
    for op, av in tree:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            lo, hi, sub = av
            repeats = hi > 1
            if repeats and outer:
                return "a repetition inside a repetition", 0, 0
            why, u, p = _backtracking_risk(sub, outer or repeats)
            if why:
                return why, 0, 0
            unbounded += u
            if hi - lo >= _SPAN_UNBOUNDED:
                unbounded += 1
            else:
                paths *= (hi - lo + 1) * p
            continue
        if name == "BRANCH":
            if outer:
                return "alternatives inside a repetition", 0, 0
            total = 0
            for sub in av[1]:
                why, u, p = _backtracking_risk(sub, outer)
                if why:
                    return why, 0, 0
                unbounded += u
                total += p
            paths *= total
            continue
        subs = []
        if name == "SUBPATTERN":
            subs = [av[-1]]
        elif name in ("ASSERT", "ASSERT_NOT"):
            subs = [av[1]]
        elif name == "ATOMIC_GROUP":
            subs = [av]
        elif name in ("GROUPREF", "GROUPREF_EXISTS"):
            return "a back-reference", 0, 0
        for sub in subs:
            why, u, p = _backtracking_risk(sub, outer)
            if why:
                return why, 0, 0
            unbounded += u
            paths *= p
    return None, unbounded, paths


_WORD = re.compile(r"\w+")


def _is_plain(key: str) -> bool:
    """a key without regex syntax (PEFT configs mostly hold module names like q_proj)"""
    return _WORD.fullmatch(key) is not None


_MAX_PATHS = 64  # e.g. (q|k|v|o)_proj: 4; an optional group: 2


@functools.lru_cache(maxsize=1024)  # get_pattern_key runs it per module name (a refusal raises: not cached)
def _checked_pattern(key: str):
    """(unbounded repetitions, paths, PEFT's (.*\\.)?(key)$ compiled, or None for a plain key) of
    key (see _backtracking_risk) if it is a regular expression whose match time stays low (PEFT
    runs it on every module name, and a hostile adapter_config.json could otherwise make loading
    hang), else ValueError."""
    if _is_plain(key):
        return 0, 1, None
    try:
        why, unbounded, paths = _backtracking_risk(_sre_parse.parse(key))
        rx = re.compile(rf"(.*\.)?({key})$")  # as matched: a flag like (?i) is legal alone, not inside the group
    except (re.error, OverflowError, RecursionError) as e:
        raise ValueError(f"rank_pattern/alpha_pattern key {key[:80]!r} is not a usable regular expression: "
                         f"{type(e).__name__}: {e}") from None
    if not why and unbounded > 2:
        why = f"{unbounded} variable-length repetitions"
    if not why and paths > _MAX_PATHS:
        why = f"{paths} ways to match (alternatives and optional items in a row)"
    if why:
        raise ValueError(f"rank_pattern/alpha_pattern key {key[:80]!r}: {why} (matching could take exponential "
                         "or high-polynomial time); refused")
    return unbounded, paths, rx


def _match_work(unbounded, paths, length):
    """an upper estimate of one match's steps (about a nanosecond each): each unbounded repetition,
    and the (.*\\.)? in front, may try every split of the name; 500 for the call itself.
    .*\\..*\\.x on a name of 999 dots: 1e9, 0.85 s."""
    return 500 + paths * (length + 1) ** (unbounded + 1)


class _Patterns:
    """PEFT's first-match rule over one rank_pattern / alpha_pattern, each key checked and compiled
    once (review: recompiling 2000 keys per module took 21 s on a 67 KB config). A plain key (a
    word, no dots) matches exactly when it is the module's last dotted component, so those are one
    dict lookup; only regex keys are tried in turn, and only up to the first plain hit."""

    def __init__(self, keys):
        self.keys = list(keys)
        self.plain, self.rx, self._all = {}, [], None  # _all: every key compiled, for names with a newline
        self.paths = [0, 0, 0]  # summed paths of the regex keys with 0, 1, 2 unbounded repetitions
        for i, k in enumerate(self.keys):
            unbounded, paths, rx = _checked_pattern(k)
            if rx is None:
                self.plain.setdefault(k, i)
            else:
                self.rx.append((i, rx))
                self.paths[unbounded] += paths

    def work(self, module: str) -> int:
        """_match_work summed over the keys first() may match as regexes on module (the most it can do)"""
        n = len(module)
        w = sum(_match_work(u, p, n) - 500 for u, p in enumerate(self.paths)) + 500 * len(self.rx)
        if "\n" in module:  # every key a regex
            w += (len(self.keys) - len(self.rx)) * _match_work(0, 1, n)
        return w

    def first(self, module: str) -> str:
        if "\n" in module:  # "." and "$" treat newlines specially: the regexes decide
            if self._all is None:
                self._all = [re.compile(rf"(.*\.)?({k})$") for k in self.keys]
            hit = next((i for i, rx in enumerate(self._all) if rx.match(module)), None)
            return module if hit is None else self.keys[hit]
        best = self.plain.get(module.rsplit(".", 1)[-1])
        for i, rx in self.rx:
            if best is not None and i > best:
                break
            if rx.match(module):
                best = i
                break
        return module if best is None else self.keys[best]


def get_pattern_key(pattern_keys, module: str) -> str:
    """PEFT's rule: the first pattern key that matches ``module`` as a dotted suffix regex, else
    ``module``. Keys whose matching could take exponential time are refused (ValueError)."""
    _check_name(module)
    pats = _Patterns(pattern_keys)
    _check_work(pats.work(module), f"{len(pats.keys)} keys on a module name of {len(module)} characters")
    return pats.first(module)


def _check_name(module):
    if len(module) > _MAX_NAME:
        raise ValueError(f"module name of {len(module)} characters (more than {_MAX_NAME}): {module[:80]!r}...")


# the pattern keys' _match_work over the modules a config may ask for (a few seconds at most): real
# configs need well under 1e9 (2 keys with two unbounded repetitions over 224 modules of 60
# characters: 1e8); a hostile one with thousands of regex keys over thousands of modules, slow keys
# over long names (a review: .*\..*\.x over 100 names of 999 dots), or many plain keys over names
# with a newline (each key then a regex: 50000 over 60 such names ran for minutes) is refused
_MAX_REGEX_WORK = 2_000_000_000


def _check_work(work, what):
    if work > _MAX_REGEX_WORK:
        raise ValueError(f"{what}: matching could take about {work / 1e9:.3g} s (more than "
                         f"{_MAX_REGEX_WORK / 1e9:g}); refused")


def _check_pattern_work(cfg, modules, path):
    pats = [_patterns(cfg, p) for p in ("rank_pattern", "alpha_pattern")]
    if any(p.keys for p in pats):
        n_rx = sum(len(p.rx) for p in pats)
        _check_work(sum(p.work(m) for p in pats for m in modules),
                    f"{path}: {n_rx} regular-expression rank_pattern/alpha_pattern keys (of "
                    f"{sum(len(p.keys) for p in pats)}) over {len(modules)} modules")


def _patterns(cfg, name):
    """cfg[name]'s _Patterns, built once per pattern dict (save_peft_adapter swaps the dicts)"""
    cache = cfg.setdefault("_patterns", {})  # name -> (the pattern dict it was built from, _Patterns)
    pat = cfg[name]
    hit = cache.get(name)
    if hit is None or hit[0] is not pat:
        hit = cache[name] = (pat, _Patterns(pat.keys()))
    return hit[1]


def _resolve(cfg, module):
    _check_name(module)
    return tuple(cfg[name].get(_patterns(cfg, name).first(module), default)
                 for name, default in (("rank_pattern", cfg["r"]), ("alpha_pattern", cfg["lora_alpha"])))


def _read_config(path):
    try:
        cfg = json_object(path, "the config")
    except (FileNotFoundError, NotADirectoryError):  # the latter: path is a file
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a PEFT adapter directory?)") from None
    pt = cfg.get("peft_type", "LORA")
    if pt != "LORA":
        raise ValueError(f"{path}: peft_type is {pt!r}; only LORA adapters are supported")
    if cfg.get("use_qalora"):
        raise ValueError(f"{path}: QA-LoRA adapters (use_qalora) are not supported")
    if cfg.get("lora_bias"):
        raise ValueError(f"{path}: lora_bias=True adapters are not supported")
    # features with which PEFT computes something other than x @ A.T @ B.T on the named modules:
    # loaded as plain LoRA they would give wrong results, so they are refused
    for key, what in (("alora_invocation_tokens", "aLoRA adapters act only on the tokens after their "
                                                  "invocation sequence"),
                      ("layer_replication", "the file's layer indices are those of the replicated model"),
                      ("megatron_config", "Megatron-parallel adapters"),
                      ("target_parameters", "adapters on nn.Parameters (e.g. MoE experts)"),
                      ("kasa_config", "KaSA scales each rank by lora_diag and truncates the base weight by SVD"),
                      ("use_bdlora", "BD-LoRA's A or B is block-diagonal, stored in blocks")):
        if cfg.get(key):
            raise ValueError(f"{path}: {key} is not supported ({what})")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda")):
        raise ValueError(f"{path}: init_lora_weights={init!r}: PEFT replaces the base weight by a residual when "
                         "it loads this adapter, so A and B do not apply to the original weight. Save it with "
                         "PEFT's conversion (save_pretrained(..., path_initial_model_for_weight_conversion=...)), "
                         "which gives a plain LoRA on the original weight")
    out = {"r": cfg.get("r", 8), "lora_alpha": cfg.get("lora_alpha", 8),  # LoraConfig defaults
           "use_rslora": cfg.get("use_rslora", False), "use_dora": cfg.get("use_dora", False),
           "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {},
           "bias": cfg.get("bias", "none"), "modules_to_save": cfg.get("modules_to_save") or []}
    def bad(name, v):
        if not finite_number(v):
            return True
        if name in ("lora_alpha", "alpha_pattern"):
            try:
                float(v)  # a JSON integer beyond float's range
            except OverflowError:
                return True
        return name in ("r", "rank_pattern") and (not integral(v) or v < 1)

    for name in ("r", "lora_alpha"):
        if bad(name, out[name]):
            raise ValueError(f"{path}: {name} must be a {'positive integer' if name == 'r' else 'finite number'}, "
                             f"got {out[name]!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        pat = out[name]
        if not isinstance(pat, dict) or not all(isinstance(k, str) and not bad(name, v) for k, v in pat.items()):
            raise ValueError(f"{path}: {name} must map strings to {'positive integers' if name == 'rank_pattern' else 'finite numbers'}, "
                             f"got {str(pat)[:200]}")
        for k in pat:
            _checked_pattern(k)
    for name in ("use_rslora", "use_dora"):
        if not isinstance(out[name], bool):
            raise ValueError(f"{path}: {name} must be true or false, got {out[name]!r}")
    return out


def _file_dtype(a):
    return "bfloat16" if a.dtype == np.uint16 else "float16" if a.dtype == np.float16 else "float32"


def _f32(a):
    """a float32 copy of a file tensor (BF16 arrives as its uint16 bits: widened exactly)"""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return np.array(a, np.float32)


def load_peft_adapter(path, *, storage: str = "auto") -> dict:
    """PEFT adapter directory -> {module name: LoRA} (module names as in the base model).

    storage: the dtype the fused kernels read A and B in. "auto" keeps the file's (bf16 / fp16
    when both of a module's A and B are, else float32); "float32", "float16" or "bfloat16" set it
    for every module, rounding to nearest once (like ``convert_lora_to_gguf --outtype``): a
    float32 file kept as bf16 halves the adapter bytes each token reads (rank 16 on a 4096x4096
    q4_0 layer: ~6% of the base's bytes as fp32, ~3% as bf16)."""
    if storage not in ("auto", "float32", "float16", "bfloat16"):
        raise ValueError(f"storage must be 'auto', 'float32', 'float16' or 'bfloat16', got {storage!r}")
    path = os.fspath(path)
    cfg = _read_config(os.path.join(path, CONFIG_NAME))
    wpath = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(wpath):
        legacy = os.path.exists(os.path.join(path, "adapter_model.bin"))
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}" + (" (only the legacy pickle adapter_model.bin, "
                                                                  "which is not read: convert it to safetensors)"
                                                                  if legacy else ""))
    tensors, _ = _st.load(wpath, bf16="bits")  # BF16 as its uint16 bits: the adapter keeps the file's dtype
    dtypes = {k: e["dtype"] for k, e in _st.read_header(wpath)[0].items()}  # U16 arrives as uint16 too
    parts, skipped = {}, []
    for key, arr in tensors.items():
        kind = None
        if key.startswith(PREFIX):
            for suf, what in _SUFFIXES.items():
                if key.endswith(suf) and len(key) > len(PREFIX) + len(suf):
                    kind, module = what, key[len(PREFIX):-len(suf)]
                    break
        if kind is None:
            skipped.append(key)
            continue
        if kind == "bias":
            raise ValueError(f"{key}: lora_B.bias (lora_bias) is not supported")
        slot = parts.setdefault(module, {})
        if kind in slot:
            raise ValueError(f"module {module!r}: two tensors for {kind} (e.g. both lora_magnitude_vector spellings)")
        if dtypes[key] not in ("F32", "F16", "BF16"):
            raise ValueError(f"{key}: dtype {dtypes[key]} is not a float adapter weight (F32, F16 or BF16)")
        slot[kind] = arr
    # a DoRA magnitude of a module whose other weights were skipped (an Embedding's lora_embedding_A /
    # B, a conv layer's): skipped with them, not taken for a Linear missing lora_A / lora_B
    for module in [m for m, p in parts.items() if set(p) == {"m"}]:
        if any(k.startswith(f"{PREFIX}{module}.") for k in skipped):
            del parts[module]
            skipped.append(f"{PREFIX}{module}.lora_magnitude_vector")
    # conv adapters (A [r, in, kh, kw], B [out, r, 1, 1]): skipped with a warning like an
    # Embedding's, so a model mixing conv and Linear layers (Whisper, ViT) still loads its Linears
    conv = [m for m, p in parts.items() if all(k in p and p[k].ndim > 2 for k in ("A", "B"))]
    for module in conv:
        skipped += [PREFIX + module + suf for suf in _SUFFIXES if PREFIX + module + suf in tensors]
        del parts[module]
    # bias="all" / "lora_only": the fine-tune changed these layers' biases too (a modules_to_save
    # layer's bias is that layer's full copy, not a LoRA layer's)
    saved = [str(n) for n in cfg["modules_to_save"]] if isinstance(cfg["modules_to_save"], list) else []

    def saved_copy(key):
        mod = key[len(PREFIX):] if key.startswith(PREFIX) else key
        return any(mod == f"{n}.bias" or mod.endswith(f".{n}.bias") for n in saved)

    biases = [k for k in skipped if k.endswith(".bias") and ".lora_" not in k and not saved_copy(k)] \
        if cfg["bias"] in ("all", "lora_only") else []
    if biases:
        warnings.warn(f"{path}: the file holds {len(biases)} trained bias tensor(s) (PEFT bias='all' or "
                      f"'lora_only'), e.g. {biases[:3]}; a LoRA does not carry them: read them from "
                      f"{WEIGHTS_NAME} and give them as the layers' bias, or outputs differ from PEFT's",
                      UserWarning, stacklevel=2)
        skipped = [k for k in skipped if k not in biases]
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} tensor(s) that are not Linear LoRA weights, e.g. "
                      f"{skipped[:3]}", UserWarning, stacklevel=2)
    for module in parts:
        _check_name(module)  # before the work estimate, which grows with the names' lengths
    _check_pattern_work(cfg, parts, path)
    out = {}
    for module in sorted(parts):
        p = parts[module]
        for kind, nm in (("A", "lora_A.weight"), ("B", "lora_B.weight")):
            if kind not in p:
                raise ValueError(f"module {module!r}: missing {nm}")
        a, b, m = p["A"], p["B"], p.get("m")
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"module {module!r}: lora_A {a.shape} and lora_B {b.shape} must be 2-D (Linear layers "
                             "only; conv adapters are not supported)")
        if cfg["use_dora"] != (m is not None):
            raise ValueError(f"module {module!r}: use_dora is {cfg['use_dora']} but lora_magnitude_vector is "
                             f"{'present' if m is not None else 'missing'}")
        r, alpha = _resolve(cfg, module)
        if a.shape[0] != r:
            raise ValueError(f"module {module!r}: lora_A has rank {a.shape[0]} but the config gives r={r} "
                             "(r / rank_pattern)")
        # A and B both bf16 (or both fp16) in the file: kept so (exact, half the bytes the kernels read
        # per token; rank 16 at 4096x4096 on q4_0: ~3.5% over the base instead of ~6% as fp32)
        kinds = {_file_dtype(a), _file_dtype(b)}
        store = storage if storage != "auto" else kinds.pop() if len(kinds) == 1 else "float32"
        try:
            # copies: the adapter must not keep the file mapped or hold read-only views
            out[module] = LoRA(_f32(a), _f32(b), alpha, rslora=cfg["use_rslora"],
                               magnitude=None if m is None else _f32(m), storage=store)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"module {module!r}: {e}") from None
    if not out:
        raise ValueError(f"{path}: no LoRA weights found (keys must look like "
                         f"'{PREFIX}<module>.lora_A.weight')")
    _colocate(out.values())  # one buffer for all (huge pages from 4 MB on): faster from DRAM
    return out


def _num(v):
    return int(v) if float(v).is_integer() else float(v)


def save_peft_adapter(path, adapters: dict, base_model_name_or_path=None) -> None:
    """Write {module name: LoRA} as a PEFT adapter directory (config + safetensors, float32 weights).

    r / lora_alpha are the most common values; modules that differ get rank_pattern / alpha_pattern
    entries keyed by their full name (as PEFT's own EVA initialisation writes them). All adapters
    must agree on rslora and on DoRA."""
    if not isinstance(adapters, dict) or not adapters:
        raise ValueError("adapters must be a non-empty dict {module name: LoRA}")
    for name, ad in adapters.items():
        if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
            raise ValueError(f"bad module name {name!r}")
        if not isinstance(ad, LoRA):
            raise TypeError(f"{name}: expected a pyqkern LoRA, got {type(ad).__name__}")
    for attr, what in (("rslora", "use_rslora"), ("is_dora", "DoRA")):
        vals = {bool(getattr(ad, attr)) for ad in adapters.values()}
        if len(vals) > 1:
            raise ValueError(f"all adapters must agree on {what} (PEFT stores one flag per adapter file)")
    rslora = bool(next(iter(adapters.values())).rslora)
    dora = bool(next(iter(adapters.values())).is_dora)
    names = sorted(adapters)
    r0 = Counter(adapters[n].rank for n in names).most_common(1)[0][0]
    a0 = Counter(adapters[n].alpha for n in names).most_common(1)[0][0]
    cfg = {"r": int(r0), "lora_alpha": _num(a0), "use_rslora": rslora, "use_dora": dora,
           "rank_pattern": {n: int(adapters[n].rank) for n in names if adapters[n].rank != r0},
           "alpha_pattern": {n: _num(adapters[n].alpha) for n in names if adapters[n].alpha != a0}}
    # a plain name is a regex that also matches dotted suffixes: every module must resolve to its own values
    def _bad():
        wrong = []
        for n in names:
            r, alpha = _resolve(cfg, n)
            if r != adapters[n].rank or float(alpha) != adapters[n].alpha:
                wrong.append(n)
        return wrong

    plain = {p: dict(cfg[p]) for p in ("rank_pattern", "alpha_pattern")}
    # escaped, then anchored: PEFT matches a key as (.*\.)?(key)$ from the start, so "^name" matches
    # that module only (a top-level q_proj beside layers.N.q_proj of another rank)
    for wrap in (re.escape, lambda k: "^" + re.escape(k)):
        if not _bad():
            break
        for pat_name in ("rank_pattern", "alpha_pattern"):
            cfg[pat_name] = {wrap(k): v for k, v in plain[pat_name].items()}
    else:
        bad = _bad()
        if bad:
            raise ValueError(f"module {bad[0]!r}: its rank/alpha cannot be expressed unambiguously with PEFT's "
                             "rank_pattern/alpha_pattern (another module name is a dotted suffix of it)")
    tensors = {}
    for n in names:
        ad = adapters[n]
        tensors[f"{PREFIX}{n}.lora_A.weight"] = ad.A
        tensors[f"{PREFIX}{n}.lora_B.weight"] = ad.B
        if ad.is_dora:
            tensors[f"{PREFIX}{n}.lora_magnitude_vector"] = ad.magnitude
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "lora_dropout": 0.0, "use_rslora": rslora,
        "use_dora": dora, "target_modules": names, "rank_pattern": cfg["rank_pattern"],
        "alpha_pattern": cfg["alpha_pattern"], "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)
        config["base_model_name_or_path"] = base_model_name_or_path
    # the config text first (a value json cannot write fails here, before any file is touched),
    # then the weights, then the config through a temporary name: an existing adapter is never
    # left with new weights beside a half-written config
    try:
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"adapter config: {e} (base_model_name_or_path must be a string or None)") from None
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    _st.save(os.path.join(path, WEIGHTS_NAME), tensors, {"format": "pt"})
    _st.write_replacing(os.path.join(path, CONFIG_NAME), lambda f: f.write(text), text=True)
