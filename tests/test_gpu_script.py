"""The prepared GPU benchmark (benchmarks/gpu/bench_gpu.py) is the one script a rare device
session runs, once: its eigh section's logic is checked here on the CPU (--smoke: same code,
small cases, the C++ solver in place of the CUDA one), so that a typo cannot waste that run."""
import json
import os
import subprocess
import sys

import pytest

from curvfast import eigen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not eigen.eigh_backend_status()["cpp"][0], reason="two-stage solver not built")
def test_bench_gpu_smoke_fills_every_eigh_case(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "bench_gpu.py"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["errors"] == []
    rows = {r["case"]: r for r in data["eigh"]}
    assert list(rows) == ["n=64", "n=200", "batch 3 x n=128", "n=300"]
    for case, r in rows.items():
        for who in ("", "curvfast_"):
            assert r[who + "seconds"] > 0, (case, who)
            # float32 solves of these sizes: both solvers well inside the 1e-5 bars
            assert r[who + "residual"] <= 1e-5 and r[who + "orthogonality"] <= 1e-5, (case, who, r)
        assert r["speedup"] == pytest.approx(r["seconds"] / r["curvfast_seconds"])
    assert "| n=300 |" in (tmp_path / "results.md").read_text()
