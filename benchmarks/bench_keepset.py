"""keep_counts (threshold search) vs the reference scripts' pair-by-pair heap.

    python benchmarks/bench_keepset.py      # table + benchmarks/results/cpu_keepset.json
    pytest benchmarks/bench_keepset.py --benchmark-enable
"""
from __future__ import annotations

import datetime
import heapq
import json
import os
import platform
import sys
import time

import pytest
import torch

import curvfast


def spectra(m: int, n: int, seed: int = 0, power: int = 6):
    """power 6: heavy-tailed like trained K-FAC factors; power 1: flat, where many pairs are
    kept and the heap is slowest."""
    g = torch.Generator().manual_seed(seed)
    lam = (torch.rand(m, generator=g, dtype=torch.float64) ** power).sort(descending=True).values
    mu = (torch.rand(n, generator=g, dtype=torch.float64) ** power).sort(descending=True).values
    return lam, mu


def heap_keep_counts(lam, mu, rho):
    """What the reference scripts do: a heap over the staircase frontier, one pair at a time."""
    lam, mu = lam.tolist(), mu.tolist()
    target = rho * sum(lam) * sum(mu)
    k = [0] * len(lam)
    heap = [(-lam[0] * mu[0], 0, 0)]
    seen = {(0, 0)}
    mass = 0.0
    while heap and mass < target:
        p, i, j = heapq.heappop(heap)
        mass -= p
        k[i] += 1
        for a, b in ((i + 1, j), (i, j + 1)):
            if a < len(lam) and b < len(mu) and (a, b) not in seen:
                seen.add((a, b))
                heapq.heappush(heap, (-lam[a] * mu[b], a, b))
    return k


@pytest.mark.parametrize("shape", [(1024, 512), (11008, 4096)])
def test_keep_counts(benchmark, shape):
    lam, mu = spectra(*shape)
    benchmark.group = f"keep-set {shape[0]}x{shape[1]}"
    benchmark(curvfast.keep_counts, lam, mu, 0.6)


def test_heap(benchmark):
    lam, mu = spectra(1024, 512)
    benchmark.group = "keep-set 1024x512"
    benchmark.pedantic(heap_keep_counts, args=(lam, mu, 0.6), rounds=1, iterations=1)


def main() -> int:
    rows = []
    for power, shapes in ((6, ((1024, 512), (4096, 1024), (11008, 4096))), (1, ((1024, 512), (4096, 1024), (11008, 4096)))):
        for shape in shapes:
            lam, mu = spectra(*shape, power=power)
            t0 = time.perf_counter()
            k = curvfast.keep_counts(lam, mu, 0.6)
            fast = time.perf_counter() - t0
            row = {"spectrum": "heavy-tailed" if power > 1 else "flat", "shape": list(shape),
                   "kept_pairs": int(k.sum()), "keep_counts_ms": round(fast * 1e3, 2)}
            if int(k.sum()) <= 3_000_000:
                t0 = time.perf_counter()
                ref = heap_keep_counts(lam, mu, 0.6)
                slow = time.perf_counter() - t0
                assert ref == k.tolist(), "heap and threshold search disagree"
                row.update(heap_s=round(slow, 2), heap_us_per_kept_pair=round(slow / max(1, int(k.sum())) * 1e6, 2),
                           speedup=round(slow / fast))
            rows.append(row)
            print(row, flush=True)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__, "rho": 0.6,
           "rows": rows}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_keepset.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
