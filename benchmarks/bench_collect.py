"""End to end on CPU: collect_factors vs kronfluence's covariance fitting.

The same ~14M-parameter Llama (hidden 384, 6 layers, seq 256), all MLP linears, the same tokens,
sampled labels in both. Runs interleaved; medians. kronfluence is optional (skipped if absent:
`pip install --no-deps kronfluence accelerate einops einconv opt-einsum`).

    python benchmarks/bench_collect.py          # table + benchmarks/results/cpu_collect.json
    pytest benchmarks/bench_collect.py --benchmark-enable
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F

import curvfast

SEQ, BATCH, N_BATCHES = 256, 8, 4


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=SEQ)
    return LlamaForCausalLM(cfg).eval()


def make_batches():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 4096, (BATCH, SEQ), generator=g),
             "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)} for _ in range(N_BATCHES)]


def run_curvfast(model, batches, backend="auto"):
    return curvfast.collect_factors(model, batches, modules="mlp", fisher="true", seed=0, progress=False,
                                    backend=backend)


def kronfluence_runner(model, batches):
    """A closure fitting kronfluence covariance matrices (true Fisher) on the same data."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    names = curvfast.resolve_modules(model, "mlp")
    model = copy.deepcopy(model)  # prepare_model wraps the tracked modules in place

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
            else:
                labels = batch["input_ids"][:, 1:].reshape(-1)
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            self.ids = torch.cat([b["input_ids"] for b in batches])

        def __len__(self):
            return self.ids.shape[0]

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}

    task = LMTask()
    prepared = prepare_model(model, task)
    out = tempfile.mkdtemp(prefix="kf-bench-")
    analyzer = Analyzer(analysis_name="bench", model=prepared, task=task, cpu=True, output_dir=out,
                        disable_tqdm=True, disable_model_save=True)
    args = FactorArguments(strategy="ekfac", use_empirical_fisher=False)

    def run():
        analyzer.fit_covariance_matrices("cov", Rows(), per_device_batch_size=BATCH, factor_args=args,
                                         overwrite_output_dir=True)
    return run


def model_fwd_bwd(model, batches):
    """The model's own activation-gradient forward + backward (no factor work), for scale."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        for b in batches:
            with torch.enable_grad():
                h = model.model.embed_tokens(b["input_ids"]).requires_grad_(True)
                logits = model(inputs_embeds=h, attention_mask=b["attention_mask"]).logits
                F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                b["input_ids"][:, 1:].reshape(-1), reduction="sum").backward()
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _has_kronfluence() -> bool:
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def setup():
    return make_model(), make_batches()


def test_curvfast_collect(benchmark, setup):
    model, batches = setup
    benchmark.group = "collect 14M Llama, 8k tokens"
    benchmark.pedantic(run_curvfast, args=(model, batches), rounds=3, iterations=1)


@pytest.mark.skipif(not _has_kronfluence(), reason="kronfluence is not installed")
def test_kronfluence_covariance(benchmark, setup):
    model, batches = setup
    benchmark.group = "collect 14M Llama, 8k tokens"
    benchmark.pedantic(kronfluence_runner(model, batches), rounds=3, iterations=1)


def main() -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    model, batches = make_model(), make_batches()
    tokens = N_BATCHES * BATCH * (SEQ - 1)
    runners = {"curvfast": lambda: run_curvfast(model, batches),
               "curvfast (torch backend)": lambda: run_curvfast(model, batches, backend="torch"),
               "model fwd+bwd only": lambda: model_fwd_bwd(model, batches)}
    if _has_kronfluence():
        runners["kronfluence covariance"] = kronfluence_runner(model, batches)
    for fn in runners.values():  # warm-up
        fn()
    times = {k: [] for k in runners}
    for _ in range(5):
        for k, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"method": k, "seconds": round(med[k], 3), "tokens_per_s": round(tokens / med[k])} for k in runners]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "model": "Llama hidden 384, 6 layers, intermediate 1024, vocab 4096 (13.7M params)",
        "tokens_per_run": tokens, "runs": 5, "rows": rows,
        "load_average": os.getloadavg(),
    }
    if "kronfluence covariance" in med:
        result["speedup_vs_kronfluence"] = round(med["kronfluence covariance"] / med["curvfast"], 2)
    print(f"{'method':<28} {'s/run':>8} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['method']:<28} {r['seconds']:>8.3f} {r['tokens_per_s']:>9}")
    if "speedup_vs_kronfluence" in result:
        print(f"curvfast vs kronfluence: {result['speedup_vs_kronfluence']}x tokens/s")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_collect.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
