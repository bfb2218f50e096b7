"""Benchmark: curvfast's two-stage C++ eigensolver vs torch.linalg.eigh (MKL syevd) on CPU.

pytest-benchmark:   python -m pytest benchmarks/bench_eigh.py --benchmark-only
script (writes benchmarks/results/cpu_eigh.json):
    python benchmarks/bench_eigh.py [--sizes 2048 4096] [--reps 3] [--dtype float32]

Timings are interleaved (torch, ours, torch, ours, ...; the order alternates per repetition) and
summarized by medians, because the CPU may be shared with other jobs; the load average before and
after is recorded. Accuracy: residual ‖AQ − QΛ‖_F/‖A‖_F and orthogonality ‖QᵀQ − I‖_F/√n in float64.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import pytest
import torch

from curvfast import eigen as eigen_mod
from curvfast.eigen import check_eigh

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_eigh.json")


def factor(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A K-FAC-like factor: XᵀX/T with T = 3n/4 < n (rank deficient, decaying spectrum)."""
    g = torch.Generator().manual_seed(seed)
    t = max(1, 3 * n // 4)
    x = torch.randn(t, n, generator=g) * torch.logspace(0, -3, n).sqrt()
    return (x.T @ x / t).to(dtype)


def run_torch(A, top=None):
    w, v = torch.linalg.eigh(A)
    w, v = w.flip(0), v.flip(1)
    return (w, v) if top is None else (w[:top], v[:, :top])


def run_cpp(A, top=None):
    return eigen_mod.eigh_twostage(A, top)


HAVE_CPP = eigen_mod._twostage_ops()[0] is not None


# ------------------------------------------------------------------------------ pytest-benchmark
@pytest.mark.parametrize("n", [500, 2048])
@pytest.mark.parametrize("impl", ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not HAVE_CPP, reason="not built"))])
def test_bench_eigh(benchmark, impl, n):
    A = factor(n)
    fn = run_torch if impl == "torch" else run_cpp
    benchmark.extra_info.update({"n": n, "dtype": "float32", "impl": impl})
    w, v = benchmark.pedantic(fn, args=(A,), rounds=3, iterations=1, warmup_rounds=1)
    res, orth = check_eigh(A.double(), w.double(), v.double())
    assert res <= 1e-5 and orth <= 1e-5


# ------------------------------------------------------------------------------ script
def _time(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "mkl": torch.backends.mkl.is_available(),
            "python": platform.python_version(), "platform": platform.platform()}


def bench_size(n: int, dtype: torch.dtype, reps: int, top: int | None = None) -> dict:
    A = factor(n, dtype)
    ts: dict[str, list[float]] = {"torch": [], "cpp": []}
    outs = {}
    for r in range(reps):
        order = ("torch", "cpp") if r % 2 == 0 else ("cpp", "torch")
        for impl in order:
            dt, outs[impl] = _time(run_torch if impl == "torch" else run_cpp, A, top)
            ts[impl].append(dt)
            print(f"  n={n} top={top} {impl:5s} rep {r}: {dt:.3f} s", flush=True)
    row = {"n": n, "dtype": str(dtype).replace("torch.", ""), "top": top, "reps": reps,
           "seconds": {k: sorted(v) for k, v in ts.items()},
           "median_s": {k: statistics.median(v) for k, v in ts.items()}}
    row["ratio_cpp_over_torch"] = row["median_s"]["cpp"] / row["median_s"]["torch"]
    row["ratio_per_rep_median"] = statistics.median(c / t for c, t in zip(ts["cpp"], ts["torch"]))
    acc = {}
    for impl, (w, v) in outs.items():
        res, orth = check_eigh(A.double(), w.double(), v.double())
        acc[impl] = {"residual": res, "orthogonality": orth}
    ref = torch.linalg.eigvalsh(A.double()).flip(0)[: (top or n)]
    for impl, (w, _) in outs.items():
        acc[impl]["max_eigenvalue_error_rel"] = float((w.double() - ref).abs().max() / ref.abs().max())
    row["accuracy"] = acc
    return row


def bench_batch(sizes: list[int], dtype: torch.dtype, reps: int) -> dict:
    Ms = [factor(n, dtype, seed=i) for i, n in enumerate(sizes)]
    ts: dict[str, list[float]] = {"torch_loop": [], "cpp_batched": []}
    for r in range(reps):
        for impl in (("torch_loop", "cpp_batched") if r % 2 == 0 else ("cpp_batched", "torch_loop")):
            if impl == "torch_loop":
                dt, _ = _time(lambda: [run_torch(M) for M in Ms])
            else:
                dt, _ = _time(lambda: eigen_mod._twostage_ops()[0].eigh_twostage_batched(Ms, 0, 0, 0))
            ts[impl].append(dt)
            print(f"  batch {len(sizes)} {impl}: {dt:.3f} s", flush=True)
    med = {k: statistics.median(v) for k, v in ts.items()}
    return {"sizes": sizes, "dtype": str(dtype).replace("torch.", ""), "reps": reps, "median_s": med,
            "ratio_cpp_over_torch": med["cpp_batched"] / med["torch_loop"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--top-frac", type=float, default=0.1, help="partial-spectrum row: top = frac * n")
    ap.add_argument("--batch", type=int, nargs="*", default=[1024, 768, 512, 512, 256, 256, 256, 128])
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if not HAVE_CPP:
        raise SystemExit(f"the two-stage solver is not built: {eigen_mod._twostage_ops()[1]}")
    dtype = getattr(torch, args.dtype)
    result = {"benchmark": "eigh cpu: curvfast two-stage (cpp) vs torch.linalg.eigh (MKL)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": _machine(), "loadavg_start": os.getloadavg(), "rows": []}
    for n in args.sizes:
        result["rows"].append(bench_size(n, dtype, args.reps))
        print(json.dumps({k: result["rows"][-1][k] for k in ("n", "median_s", "ratio_cpp_over_torch")}), flush=True)
    if args.top_frac:
        n = args.sizes[0]
        result["rows"].append(bench_size(n, dtype, args.reps, top=max(1, int(args.top_frac * n))))
    if args.batch:
        result["batch"] = bench_batch(args.batch, dtype, args.reps)
    result["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
