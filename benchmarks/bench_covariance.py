"""Benchmark of the CPU covariance update ``acc += xᵀ x`` against torch's GEMM (MKL).

Two ways to run it:

* ``pytest benchmarks/bench_covariance.py --benchmark-only``: one pytest-benchmark case per
  (backend, d), grouped by d, with ``acc.addmm_(x.T, x)`` as the baseline.
* ``python benchmarks/bench_covariance.py``: times the C++ kernel and addmm side by side in
  one process (interleaved, median of several repetitions, so a busy shared machine slows
  both alike), measures both errors against a float64 reference, prints a table and writes
  ``benchmarks/results/cpu_covariance.json`` and ``.md`` with the machine facts.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from curvfast import ops

T_DEFAULT = 4096
D_DEFAULT = (1024, 2048, 4096)
RESULTS = Path(__file__).resolve().parent / "results"


def _inputs(d: int, T: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, d, generator=g).to(dtype)


def _addmm(acc: torch.Tensor, x: torch.Tensor) -> None:
    acc.addmm_(x.T, x)


def _cpp(acc: torch.Tensor, x: torch.Tensor) -> None:
    torch.ops.curvfast.covariance_update_(acc, x, None)


def _torch(acc: torch.Tensor, x: torch.Tensor) -> None:
    ops.covariance_update(acc, x, backend="torch")


# --------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # running as a script without pytest
    pytest = None

if pytest is not None:
    _CASES = [("addmm", _addmm), ("torch", _torch)]
    if ops.backend_status()["cpp"][0]:
        _CASES.append(("cpp", _cpp))

    @pytest.mark.parametrize("d", D_DEFAULT)
    @pytest.mark.parametrize("name,fn", _CASES, ids=[c[0] for c in _CASES])
    def test_covariance_update(benchmark, name, fn, d):
        x = _inputs(d, T_DEFAULT)
        acc = torch.zeros(d, d)
        benchmark.group = f"covariance_update T={T_DEFAULT} d={d}"
        benchmark.extra_info.update(backend=name, d=d, T=T_DEFAULT, dtype="float32",
                                    threads=torch.get_num_threads())
        benchmark.pedantic(fn, args=(acc, x), rounds=5, iterations=1, warmup_rounds=1)


# --------------------------------------------------------------------------------------
# Side-by-side script
# --------------------------------------------------------------------------------------
def _max_err(fn, x: torch.Tensor, weight=None) -> tuple[float, float]:
    """(max abs error vs float64, that error relative to max |exact|) from a zero acc."""
    d = x.shape[1]
    x64 = x.double()
    xw = x64 if weight is None else x64 * weight.double().unsqueeze(1)
    ref = xw.T @ x64
    acc = torch.zeros(d, d)
    fn(acc, x) if weight is None else fn(acc, x, weight)
    err = (acc.double() - ref).abs().max().item()
    return err, err / ref.abs().max().item()


def _time_interleaved(fns: dict, d: int, x: torch.Tensor, reps: int) -> dict[str, list[float]]:
    accs = {k: torch.zeros(d, d) for k in fns}
    for k, fn in fns.items():  # warm-up (allocations, thread pools, page faults)
        fn(accs[k], x)
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            t0 = time.perf_counter()
            fns[k](accs[k], x)
            times[k].append(time.perf_counter() - t0)
    return times


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    isa = None
    if ops.backend_status()["cpp"][0]:
        from curvfast import _C
        isa = _C.cpu_isa()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "curvfast_cpu_isa": isa,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg()[0],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, nargs="+", default=list(D_DEFAULT))
    ap.add_argument("--T", type=int, default=T_DEFAULT)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-write", action="store_true", help="print only, do not write results/")
    args = ap.parse_args(argv)
    if not ops.backend_status()["cpp"][0]:
        raise SystemExit(f"curvfast._C unavailable: {ops.backend_status()['cpp'][1]}")

    info = _machine()
    rows = []
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"kernel {info['curvfast_cpu_isa']}, load {info['loadavg_start']:.2f}")
    hdr = (f"{'d':>6} {'T':>6} {'addmm ms':>9} {'cpp ms':>8} {'ratio':>6} {'cpp GF/s*':>9} "
           f"{'err addmm':>10} {'err cpp':>10} {'err ratio':>9}")
    print(hdr)
    for d in args.d:
        x = _inputs(d, args.T)
        times = _time_interleaved({"addmm": _addmm, "cpp": _cpp}, d, x, args.reps)
        t_mm = statistics.median(times["addmm"])
        t_cpp = statistics.median(times["cpp"])
        err_mm, rel_mm = _max_err(_addmm, x)
        err_cpp, rel_cpp = _max_err(_cpp, x)
        row = {
            "d": d, "T": args.T, "dtype": "float32", "reps": args.reps,
            "addmm_ms_median": t_mm * 1e3, "cpp_ms_median": t_cpp * 1e3,
            "addmm_ms_all": [t * 1e3 for t in times["addmm"]], "cpp_ms_all": [t * 1e3 for t in times["cpp"]],
            "speedup_median": t_mm / t_cpp,
            "speedup_min": min(times["addmm"]) / min(times["cpp"]),
            # useful flops of the symmetric product (the full GEMM does twice as many)
            "cpp_useful_gflops": args.T * d * d / t_cpp / 1e9,
            "addmm_gflops": 2 * args.T * d * d / t_mm / 1e9,
            "err_addmm": err_mm, "err_cpp": err_cpp, "rel_err_addmm": rel_mm, "rel_err_cpp": rel_cpp,
            "err_ratio": err_cpp / err_mm if err_mm > 0 else float("nan"),
        }
        rows.append(row)
        print(f"{d:>6} {args.T:>6} {t_mm * 1e3:>9.1f} {t_cpp * 1e3:>8.1f} {row['speedup_median']:>6.2f} "
              f"{row['cpp_useful_gflops']:>9.0f} {err_mm:>10.3e} {err_cpp:>10.3e} {row['err_ratio']:>9.2f}")

    # Reduced-precision and weighted inputs: error against the fp32 GEMM on the same upcast data.
    acc_rows = []
    d_chk = min(args.d)
    g = torch.Generator().manual_seed(1)
    w = torch.rand(args.T, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        for weighted in (False, True):
            x = _inputs(d_chk, args.T, dtype)
            wt = w if weighted else None
            e_ref, _ = _max_err(lambda a, xx, ww=None: ops.covariance_update_ref(a, xx, ww), x, wt)
            e_cpp, _ = _max_err(lambda a, xx, ww=None: torch.ops.curvfast.covariance_update_(a, xx, ww), x, wt)
            acc_rows.append({"d": d_chk, "T": args.T, "dtype": str(dtype).replace("torch.", ""),
                             "weighted": weighted, "err_torch_fp32": e_ref, "err_cpp": e_cpp,
                             "err_ratio": e_cpp / e_ref if e_ref > 0 else float("nan")})
            print(f"  accuracy d={d_chk} {acc_rows[-1]['dtype']:>8} weighted={weighted!s:>5}: "
                  f"torch fp32 {e_ref:.3e}  cpp {e_cpp:.3e}  ratio {acc_rows[-1]['err_ratio']:.2f}")
    info["loadavg_end"] = os.getloadavg()[0]
    print("* useful flops T*d^2 (one triangle); ratio = addmm median / cpp median, interleaved runs")
    result = {"machine": info, "op": "covariance_update_ (acc += x^T x), fp32 x, acc fp32",
              "baseline": "acc.addmm_(x.T, x)", "timing": rows, "accuracy": acc_rows}
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "cpu_covariance.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "cpu_covariance.md").write_text(_markdown(result))
        print(f"wrote {RESULTS / 'cpu_covariance.json'} and .md")
    return result


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# CPU covariance update vs torch addmm",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['blas']}, {m['torch_threads']} threads), "
        f"curvfast kernel `{m['curvfast_cpu_isa']}`, {m['date']}, load average "
        f"{m['loadavg_start']:.2f} -> {m['loadavg_end']:.2f} (shared machine).",
        "",
        "Interleaved runs, medians; errors are max |acc - exact| against a float64 product from a zero accumulator.",
        "",
        "| d | T | addmm ms | cpp ms | speedup (median) | speedup (min) | err addmm | err cpp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["timing"]:
        lines.append(f"| {r['d']} | {r['T']} | {r['addmm_ms_median']:.1f} | {r['cpp_ms_median']:.1f} | "
                     f"{r['speedup_median']:.2f}x | {r['speedup_min']:.2f}x | {r['err_addmm']:.3e} | {r['err_cpp']:.3e} |")
    lines += ["", "| d | T | x dtype | weighted | err torch fp32 GEMM | err cpp | ratio |", "|---|---|---|---|---|---|---|"]
    for r in result["accuracy"]:
        lines.append(f"| {r['d']} | {r['T']} | {r['dtype']} | {r['weighted']} | {r['err_torch_fp32']:.3e} | "
                     f"{r['err_cpp']:.3e} | {r['err_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ops._load_ext()
    main()
