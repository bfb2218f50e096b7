"""GPU collection job: random-init OLMo-2-7B config in bf16, factors of gate/up/down of
layers 23-25 at sequence length 512, curvfast vs a kronfluence-style baseline (hooks, fp32
addmm with TF32 off, full backward with weight gradients), measured in the same run.

Used as the "collect" section of bench_gpu.py; runnable alone:
    python3 benchmarks/gpu/bench_collect.py --tokens 1048576
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

LAYERS = (23, 24, 25)
SEQ = 512
BATCH = 16
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: dry run with --tiny only
TINY = False


def sync():
    if DEV == "cuda":
        sync()


def olmo2_7b_config():
    from transformers import Olmo2Config

    if TINY:
        return Olmo2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=26,
                           num_attention_heads=4, num_key_value_heads=4, pad_token_id=1, bos_token_id=None,
                           eos_token_id=2)
    return Olmo2Config(vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       pad_token_id=1, bos_token_id=None, eos_token_id=100257)


def build_model():
    from transformers import Olmo2ForCausalLM

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = Olmo2ForCausalLM(olmo2_7b_config())
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def batches(n: int, vocab: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    for _ in range(n):
        yield {"input_ids": torch.randint(0, vocab, (BATCH, SEQ), device=DEV, generator=g)}


def kronfluence_style(model, names, n_batches: int) -> float:
    """Seconds per batch of the common practice: fp32 addmm per factor, full backward with
    weight gradients of every parameter."""
    mods = {n: model.get_submodule(n) for n in names}
    A = {n: torch.zeros(m.in_features, m.in_features, device=DEV) for n, m in mods.items()}
    G = {n: torch.zeros(m.out_features, m.out_features, device=DEV) for n, m in mods.items()}
    handles = []
    for n, m in mods.items():
        def fwd(mod, args, out, n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            A[n].addmm_(x.T, x)

            def bwd(g, n=n):
                g = g.reshape(-1, g.shape[-1]).float()
                G[n].addmm_(g.T, g)
            out.register_hook(bwd)
        handles.append(m.register_forward_hook(fwd))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    gen = torch.Generator(device=DEV).manual_seed(1)
    times = []
    try:
        for i, b in enumerate(batches(n_batches + 1, model.config.vocab_size, seed=7)):
            sync()
            t0 = time.time()
            logits = model(**b, use_cache=False).logits[:, :-1].float()
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits.reshape(-1, logits.shape[-1]), -1), 1, generator=gen)
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.squeeze(1), reduction="sum").backward()
            model.zero_grad(set_to_none=True)
            sync()
            if i > 0:  # first batch warms up
                times.append(time.time() - t0)
            del logits
    finally:
        for h in handles:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
        model.zero_grad(set_to_none=True)
    return sum(times) / len(times)


def bench_collect(res, budget, tokens: int = 1 << 20) -> None:
    import curvfast

    torch.backends.cuda.matmul.allow_tf32 = False
    rows = res.data.setdefault("collect", [])
    t0 = time.time()
    model = build_model()
    init_s = time.time() - t0
    names = curvfast.resolve_modules(model, "mlp", layers=list(LAYERS))
    per_batch_tokens = BATCH * (SEQ - 1)
    n_batches = max(2, math.ceil(tokens / per_batch_tokens))
    # Warm-up (Triton autotuning and compiles) on two batches, not timed.
    curvfast.collect_factors(model, batches(2, model.config.vocab_size, seed=3), modules=names, fisher="true",
                             seed=0, progress=False)
    sync()
    left = budget.left() - 60  # keep time for the baseline
    probe_t = time.time()
    curvfast.collect_factors(model, batches(4, model.config.vocab_size, seed=4), modules=names, fisher="true",
                             seed=0, progress=False)
    sync()
    per_batch = (time.time() - probe_t) / 4
    if per_batch * n_batches > left:
        n_batches = max(4, int(left / per_batch))
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = time.time()
    fs = curvfast.collect_factors(model, batches(n_batches, model.config.vocab_size), modules=names, fisher="true",
                                  seed=0, progress=False)
    sync()
    ours_s = time.time() - t1
    peak = torch.cuda.max_memory_allocated() if DEV == "cuda" else 0
    ours_tps = fs.tokens / ours_s
    base_batches = 3 if budget.left() > 40 else 1
    base_s = kronfluence_style(model, names, base_batches)
    base_tps = per_batch_tokens / base_s
    row = {
        "model": "OLMo-2-7B config, random init, bf16", "modules": len(names), "layers": list(LAYERS),
        "seq_len": SEQ, "batch": BATCH, "tokens": fs.tokens, "seconds": round(ours_s, 2),
        "tokens_per_s": round(ours_tps), "baseline_tokens_per_s": round(base_tps), "speedup": round(ours_tps / base_tps, 2),
        "baseline_batches": base_batches, "peak_mem_gib": round(peak / 2**30, 1), "init_s": round(init_s, 1),
        "minutes_for_20M_tokens": round(20e6 / ours_tps / 60, 1),
    }
    rows.append(row)
    print(f"[bench] collect {row}", flush=True)
    res.flush()


if __name__ == "__main__":
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_gpu import Budget, Results, meta

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU dry run of the script)")
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu")
    a = p.parse_args()
    TINY = a.tiny
    if a.tiny:
        SEQ, BATCH = 32, 2
    r = Results(a.out, meta())
    bench_collect(r, Budget(None), a.tokens)
