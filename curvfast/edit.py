"""The curvature edit W' = U_G (C ⊙ M) U_Aᵀ with C = U_Gᵀ W U_A (SPEC §2.3–2.6), the SVD
baseline, and in-place editing of a model with undo."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from curvfast.keepset import keep_counts, keep_mask, kept_mass
from curvfast.modules import weight_matrix


def _check_edit_args(W: torch.Tensor, evals_G, evecs_G, evals_A, evecs_A) -> None:
    d_out, d_in = W.shape
    if evecs_G.shape != (d_out, d_out) or evals_G.shape != (d_out,):
        raise ValueError(f"G eigenbasis has shapes {tuple(evals_G.shape)}, {tuple(evecs_G.shape)} but the weight "
                         f"has d_out = {d_out}")
    if evecs_A.shape != (d_in, d_in) or evals_A.shape != (d_in,):
        raise ValueError(f"A eigenbasis has shapes {tuple(evals_A.shape)}, {tuple(evecs_A.shape)} but the weight "
                         f"has d_in = {d_in}")
    if not torch.isfinite(W).all():
        raise ValueError("weight contains NaN/Inf")


def edit_weight_ref(W: torch.Tensor, evals_G: torch.Tensor, evecs_G: torch.Tensor, evals_A: torch.Tensor,
                    evecs_A: torch.Tensor, rho: float) -> torch.Tensor:
    """Reference: the explicit masked formula in float64, returned in W's dtype."""
    _check_edit_args(W, evals_G, evecs_G, evals_A, evecs_A)
    k = keep_counts(evals_G, evals_A, rho)
    UG, UA = evecs_G.double().cpu(), evecs_A.double().cpu()
    C = UG.T @ W.double().cpu() @ UA
    M = keep_mask(k, W.shape[1]).double()
    return (UG @ (C * M) @ UA.T).to(device=W.device, dtype=W.dtype)


def edit_weight(W: torch.Tensor, evals_G: torch.Tensor, evecs_G: torch.Tensor, evals_A: torch.Tensor,
                evecs_A: torch.Tensor, rho: float, k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``U_G (C ⊙ M) U_Aᵀ`` in fp32, returned in W's dtype and device.

    W: (d_out, d_in). evals_G: (d_out,) descending, evecs_G: (d_out, d_out);
    evals_A: (d_in,), evecs_A: (d_in, d_in). rho: curvature-mass fraction kept.
    k: precomputed keep counts (from :func:`keep_counts`), to skip the search.
    """
    _check_edit_args(W, evals_G, evecs_G, evals_A, evecs_A)
    if k is None:
        k = keep_counts(evals_G, evals_A, rho)
    dev = evecs_G.device
    d_out, d_in = W.shape
    if int(k.min()) == d_in:  # everything kept: W' = W exactly, no rounding
        return W.clone()
    UG, UA = evecs_G.float(), evecs_A.to(device=dev, dtype=torch.float32)
    C = UG.T @ W.to(device=dev, dtype=torch.float32) @ UA
    C.masked_fill_(~keep_mask(k, d_in, device=dev), 0.0)
    return (UG @ C @ UA.T).to(device=W.device, dtype=W.dtype)


def svd_truncate(W: torch.Tensor, rho: Optional[float] = None, rank: Optional[int] = None) -> torch.Tensor:
    """Baseline: keep the top singular values of W.

    rho: keep the smallest rank whose singular values hold fraction ``rho`` of Σs² (energy),
    or rank: keep exactly this many. Computed in fp32, returned in W's dtype.
    """
    if (rho is None) == (rank is None):
        raise ValueError("give exactly one of rho or rank")
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    if rank is None:
        if rho >= 1:
            return W.clone()
        energy = torch.cumsum(S.double() ** 2, 0)
        total = float(energy[-1]) if energy.numel() else 0.0
        rank = 0 if rho <= 0 or total == 0 else int(torch.searchsorted(energy, rho * total)) + 1
    rank = max(0, min(int(rank), S.numel()))
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).to(W.dtype)


@dataclass
class EditResult:
    """What :func:`edit_model` changed, with a way back."""

    reports: dict[str, dict]
    _originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _model: Optional[nn.Module] = field(default=None, repr=False)

    def undo(self) -> None:
        """Restore every edited weight bit for bit."""
        if self._model is None:
            raise RuntimeError("this edit has already been undone")
        with torch.no_grad():
            for name, w in self._originals.items():
                weight_matrix(self._model.get_submodule(name)).copy_(w)
        self._model = None
        self._originals = {}

    def summary(self) -> str:
        return format_reports(self.reports)


def format_reports(reports: Mapping[str, dict]) -> str:
    """A table of per-module edit reports."""
    lines = [f"{'module':<48} {'kept mass':>9} {'kept pairs':>11} {'|dW|/|W|':>9}"]
    for name, r in reports.items():
        lines.append(f"{name:<48} {r['kept_mass']:>9.4f} {r['kept_fraction']:>10.2%} {r['rel_change']:>9.4f}")
    return "\n".join(lines)


def edit_model(model: nn.Module, eigen: Mapping, rho: Union[float, Mapping[str, float]] = 0.6,
               modules: Optional[list[str]] = None) -> EditResult:
    """Edit the weights of ``modules`` (default: every module in ``eigen``) in place.

    rho: one fraction for all, or a dict module name → fraction. Biases are left as they are.
    Returns an :class:`EditResult` with a report per module (kept mass, kept pairs,
    eigenvectors touched, ‖ΔW‖/‖W‖) and ``undo()``.
    """
    names = list(eigen) if modules is None else list(modules)
    missing = [n for n in names if n not in eigen]
    if missing:
        raise KeyError(f"no eigenbasis for modules {missing}; collect factors for them first")
    rhos = {n: (rho[n] if isinstance(rho, Mapping) else rho) for n in names}
    if isinstance(rho, Mapping):
        unknown = set(rho) - set(names)
        if unknown:
            raise KeyError(f"rho given for modules that are not edited: {sorted(unknown)}")
    for n, r in rhos.items():
        if not (isinstance(r, (int, float)) and math.isfinite(r) and 0.0 <= r <= 1.0):
            raise ValueError(f"rho for {n} must be in [0, 1], got {r!r}")
    targets = weight_targets(model, names, hint=" (are these eigenbases from another model?)")
    for n, W in targets.items():
        e = eigen[n]
        _check_edit_args(W, e.evals_G, e.evecs_G, e.evals_A, e.evecs_A)
    result = EditResult(reports={}, _model=model)
    with torch.no_grad():
        for n, W in targets.items():
            e = eigen[n]
            k = keep_counts(e.evals_G, e.evals_A, rhos[n])
            new = edit_weight(W, e.evals_G, e.evecs_G, e.evals_A, e.evecs_A, rhos[n], k=k)
            result._originals[n] = W.detach().clone()
            result.reports[n] = edit_report(W, new, e.evals_G, e.evals_A, k, rhos[n])
            W.copy_(new)
    return result


def weight_targets(model: nn.Module, names: list[str], hint: str = "") -> dict[str, torch.Tensor]:
    """Module name → weight as (d_out, d_in), all resolved before any weight is touched, so
    that an edit is all or nothing."""
    out = {}
    for n in names:
        try:
            mod = model.get_submodule(n)
        except AttributeError:
            raise KeyError(f"the model has no module {n!r}{hint}") from None
        out[n] = weight_matrix(mod)
    return out


def edit_report(W: torch.Tensor, new: torch.Tensor, evals_G: torch.Tensor, evals_A: torch.Tensor,
                k: torch.Tensor, rho: float) -> dict:
    """What an edit did to one weight: kept mass and pairs, eigenvectors touched, ‖ΔW‖/‖W‖."""
    d_out, d_in = W.shape
    kept = int(k.sum())
    return {
        "rho": rho, "kept_mass": kept_mass(evals_G, evals_A, k), "kept_pairs": kept,
        "kept_fraction": kept / (d_out * d_in) if d_out * d_in else 1.0,
        "g_vectors_touched": int((k < d_in).sum()), "a_vectors_touched": d_in - int(k.min()) if d_out else 0,
        "rel_change": rel_change(W, new), "shape": [d_out, d_in],
    }


def rel_change(W: torch.Tensor, new: torch.Tensor) -> float:
    """‖new − W‖_F / ‖W‖_F (0 for a zero W), in row blocks: no full-size fp32 copies."""
    sq_norm = sq_delta = 0.0
    for r in range(0, W.shape[0], 1024):
        w = W[r:r + 1024].float()
        sq_norm += float(w.square().sum())
        sq_delta += float((new[r:r + 1024].float() - w).square().sum())
    return (sq_delta / sq_norm) ** 0.5 if sq_norm > 0 else 0.0
