"""Activation-band analysis (paper §4): how much of a data set's layer-input energy lies in
the high- and low-curvature directions of the input factor A.

For an edited layer with input x and ``A = U_A diag(μ) U_Aᵀ`` (μ descending), the energy of
x along eigen-direction j is (u_jᵀ x)². Directions are grouped by their rank in μ into bands
(default: top 10%, 10–25%, 25–50%, bottom 50% of the directions); a band's share is

    Σ_{samples} Σ_{j ∈ band} (u_jᵀ x)²  /  Σ_{samples} ‖x‖²,

so the shares sum to 1. On the very data the factors were collected from, a band's share is
exactly its share of Σμ (since A is the mean of x xᵀ); data that leans more than that on the
bottom bands — memorized sequences, in the paper — rely on the low-curvature directions the
edit removes.

Band edges over n directions: band k covers ranks [round(f_{k−1} n), round(f_k n)).
Samples follow :mod:`curvfast.collect`'s convention: for a causal LM, position t counts when
tokens t and t+1 are real (``attention_mask``); for a classifier (``pixel_values`` batches),
position 0 (CLS) of each example.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["DEFAULT_BANDS", "band_edges", "band_labels", "band_fractions", "band_energy", "format_bands"]

#: cumulative fractions of eigen-directions (by descending eigenvalue) closing each band
DEFAULT_BANDS = (0.10, 0.25, 0.50, 1.00)


def band_edges(n: int, bands: Sequence[float] = DEFAULT_BANDS) -> list[int]:
    """[0, e_1, ..., n]: band k covers direction ranks [e_{k}, e_{k+1})."""
    if not bands or abs(bands[-1] - 1.0) > 1e-12 or any(b <= a for a, b in zip((0.0,) + tuple(bands), bands)):
        raise ValueError(f"bands must be increasing cumulative fractions ending at 1.0, got {tuple(bands)}")
    return [0] + [int(round(f * n)) for f in bands[:-1]] + [n]


def band_labels(bands: Sequence[float] = DEFAULT_BANDS) -> list[str]:
    """'top 10%', '10–25%', ..., 'bottom 50%'."""
    out, lo = [], 0.0
    for i, hi in enumerate(bands):
        if i == 0:
            out.append(f"top {hi:.0%}")
        elif i == len(bands) - 1:
            out.append(f"bottom {1 - lo:.0%}")
        else:
            out.append(f"{lo:.0%}–{hi:.0%}")
        lo = hi
    return out


def _band_sums(x: torch.Tensor, evecs_A: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """Energy per band summed over rows: x (T, d), evecs (d, d) → (len(edges) − 1,) float64."""
    proj = x.double() @ evecs_A.double()               # (T, d): coordinates in A's eigenbasis
    per_dir = proj.square().sum(dim=0)                 # (d,)
    return torch.stack([per_dir[a:b].sum() for a, b in zip(edges[:-1], edges[1:])])


def band_fractions(x: torch.Tensor, evecs_A: torch.Tensor, bands: Sequence[float] = DEFAULT_BANDS) -> torch.Tensor:
    """Share of the energy of the rows of ``x`` (T, d) in each band of ``evecs_A`` (d, d),
    columns ordered by descending eigenvalue. Returns (len(bands),) float64 summing to 1."""
    if x.dim() != 2 or evecs_A.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"band_fractions: x must be (T, d) and evecs_A (d, d), got {tuple(x.shape)} and "
                         f"{tuple(evecs_A.shape)}")
    sums = _band_sums(x, evecs_A, band_edges(x.shape[1], bands))
    total = float(sums.sum())
    return sums / total if total > 0 else torch.full_like(sums, float("nan"))


@torch.no_grad()
def band_energy(model: nn.Module, eigen: Mapping, batches: Iterable[Any], bands: Sequence[float] = DEFAULT_BANDS,
                modules: Optional[Sequence[str]] = None, progress: bool = False) -> dict[str, dict]:
    """Band shares of the layer-input energy of a data set, per input factor.

    eigen: an EigenSet (only ``evecs_A``/``evals_A`` and ``a_key`` are used). modules: the
    modules to analyse (default: all in ``eigen``); modules sharing an A (gate/up) are
    analysed once, under their ``a_key``.
    Returns ``{a_key: {"modules": [...], "bands": [labels], "fraction": [...], "mu_fraction": [...],
    "samples": N}}``; ``mu_fraction`` is each band's share of Σμ (the shares the factor data
    itself has), the reference to compare ``fraction`` with.
    """
    from curvfast.collect import _as_batch, _counted_positions
    from curvfast.evaluate import _eval_mode, _model_device, _progress

    names = list(eigen) if modules is None else list(modules)
    groups: dict[str, list[str]] = {}
    for n in names:
        if n not in eigen:
            raise KeyError(f"band_energy: no eigenbasis for {n!r}")
        groups.setdefault(eigen[n].a_key, []).append(n)
    owners = {key: ms[0] for key, ms in groups.items()}
    edges = {key: band_edges(eigen[m].evecs_A.shape[0], bands) for key, m in owners.items()}
    sums = {key: torch.zeros(len(bands), dtype=torch.float64) for key in owners}
    samples = {key: 0 for key in owners}
    state: dict[str, Any] = {}

    def hook_for(key: str):
        def hook(module, args):
            x = args[0]
            x = x.reshape(-1, x.shape[-1]) if state["index"] is not None else x.reshape(state["B"], -1, x.shape[-1])[:, 0]
            if state["index"] is not None:
                x = x.index_select(0, state["index"].to(x.device))
            U = eigen[owners[key]].evecs_A.to(device=x.device)
            sums[key] += _band_sums(x, U, edges[key]).cpu()
            samples[key] += x.shape[0]
        return hook

    device = _model_device(model)
    handles = [model.get_submodule(m).register_forward_pre_hook(hook_for(key)) for key, m in owners.items()]
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        with _eval_mode(model):
            for batch in _progress(batches, total or 0, "bands", progress):
                b = _as_batch(batch, device)
                inputs = {k: v for k, v in b.items() if k != "labels" and k != "memorized"}
                classifier = "pixel_values" in b or not ("input_ids" in b and b["input_ids"].dim() == 2)
                if classifier:
                    state["index"] = None
                    state["B"] = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
                    model(**inputs)
                else:
                    state["index"], _ = _counted_positions(b)
                    if state["index"].numel() == 0:
                        continue
                    model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, m in owners.items():
        mu = eigen[m].evals_A.double().cpu()
        e = edges[key]
        mu_b = torch.stack([mu[a:b].sum() for a, b in zip(e[:-1], e[1:])])
        tot = float(sums[key].sum())
        out[key] = {"modules": groups[key], "bands": band_labels(bands),
                    "fraction": (sums[key] / tot).tolist() if tot > 0 else [float("nan")] * len(bands),
                    "mu_fraction": (mu_b / mu_b.sum()).tolist() if float(mu_b.sum()) > 0 else [float("nan")] * len(bands),
                    "samples": samples[key]}
    return out


def format_bands(results: Mapping[str, Mapping[str, dict]]) -> str:
    """Markdown table: one row per (data set, layer input), one column per band, plus each
    layer input's Σμ shares (what the factor data itself gives) for reference.
    results: data-set name → :func:`band_energy` output."""
    first = next(iter(results.values()))
    labels = next(iter(first.values()))["bands"]
    lines = ["| data | layer input | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for key, r in first.items():
        lines.append(f"| (Σμ share) | {key} | " + " | ".join(f"{f:.1%}" for f in r["mu_fraction"]) + " |")
    for data, res in results.items():
        for key, r in res.items():
            lines.append(f"| {data} | {key} | " + " | ".join(f"{f:.1%}" for f in r["fraction"]) + " |")
    return "\n".join(lines)
