"""Baselines the curvature edit is compared with (SPEC §6), with :func:`curvfast.edit_model`'s
interface: they edit a model in place and return an :class:`~curvfast.edit.EditResult` whose
``undo()`` restores every touched weight bit for bit.

- :func:`svd_model` — SVD truncation of the same matrices (drop the smallest singular values).
- :func:`balanced_subnet` — BalancedSubnet: learn a binary mask that prunes a fixed fraction p
  of each matrix's weights so that the model forgets a *forget* set while keeping a *retain*
  set. Unlike the K-FAC edit it needs labels of what is memorized.

BalancedSubnet, as implemented here:

- one score tensor s per weight matrix (same shape as the stored parameter), initialized to
  |W| so that training starts from magnitude pruning, which barely changes the model;
- mask m = 1 except at the ``round(p · numel)`` entries of smallest |s| (ties by index), so
  exactly that many weights of *every* matrix are pruned, at every step;
- the forward pass uses W ⊙ m (W frozen); the straight-through gradient treats the hard
  top-|s| selection as the identity in |s|: ∂L/∂s = ∂L/∂m · sign(s), ∂L/∂m = ∂L/∂(W ⊙ m) ⊙ W;
- loss −(1 − λ) · CE(memorized rows) + λ · CE(retain rows), token-mean CE per part;
- SGD with momentum on the scores only.

Guard: a batch with no memorized row contributes no forget term (instead of the NaN of a mean
over nothing), and a batch with no retain row no retain term; a batch with neither is skipped.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from curvfast.edit import EditResult, rel_change, weight_targets

__all__ = ["svd_model", "balanced_subnet", "prune_mask", "mixed_batches", "BalancedSubnetResult"]


def _targets(model: nn.Module, modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """Validate all module names before anything is touched: an edit is all or nothing."""
    out = weight_targets(model, list(modules))
    if not out:
        raise ValueError("no modules to edit")
    return out


# --------------------------------------------------------------------------------------
# SVD truncation
# --------------------------------------------------------------------------------------
def svd_model(model: nn.Module, modules: Iterable[str], rho: Optional[float] = None,
              rank: Optional[int] = None) -> EditResult:
    """SVD-truncate the weight of every module in ``modules`` in place (SPEC §6).

    rho: keep the smallest rank holding fraction ``rho`` of Σs² (singular-value energy); or
    rank: keep exactly this many singular values. Returns an EditResult with per-module
    reports (rank kept, full rank, ‖ΔW‖/‖W‖) and ``undo()``.
    """
    from curvfast.edit import svd_truncate

    if (rho is None) == (rank is None):
        raise ValueError("svd_model: give exactly one of rho or rank")
    if rho is not None and not (math.isfinite(rho) and 0.0 <= rho <= 1.0):
        raise ValueError(f"svd_model: rho must be in [0, 1], got {rho!r}")
    targets = _targets(model, modules)
    result = EditResult(reports={}, _model=model)
    with torch.no_grad():
        for n, W in targets.items():
            new = svd_truncate(W, rho=rho, rank=rank)
            kept = int(torch.linalg.matrix_rank(new.float())) if new.numel() else 0
            result._originals[n] = W.detach().clone()
            result.reports[n] = {"method": "svd", "rho": rho, "rank": kept, "full_rank": min(W.shape),
                                 "rel_change": rel_change(W, new), "shape": list(W.shape),
                                 "kept_mass": float("nan"), "kept_fraction": kept / max(1, min(W.shape))}
            W.copy_(new)
    return result


# --------------------------------------------------------------------------------------
# BalancedSubnet
# --------------------------------------------------------------------------------------
def prune_mask(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Float mask of ``scores``' shape: 0 at the ``round(p · numel)`` entries of smallest |s|
    (ties broken by lower flat index first), 1 elsewhere."""
    n = scores.numel()
    k = int(round(p * n))
    m = torch.ones(n, dtype=scores.dtype, device=scores.device)
    if k > 0:
        # stable sort: equal |s| pruned in index order, so the count is exact with ties
        idx = torch.sort(scores.detach().abs().reshape(-1), stable=True).indices[:k]
        m[idx] = 0
    return m.view_as(scores)


class _StraightThroughMask(torch.autograd.Function):
    """Forward: the hard top-|s| mask. Backward: the identity in |s| (straight-through)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, p: float) -> torch.Tensor:
        ctx.save_for_backward(scores)
        return prune_mask(scores, p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scores,) = ctx.saved_tensors
        return grad * torch.sign(scores), None


def mixed_batches(forget: Sequence[Sequence[int]], retain: Sequence[Sequence[int]], batch_size: int = 8,
                  seed: int = 0, pad_id: int = 0) -> list[dict]:
    """Shuffle forget and retain sequences together into right-padded batches with a
    ``memorized`` (B,) bool flag per row, the input :func:`balanced_subnet` trains on."""
    rows = [(list(map(int, s)), True) for s in forget] + [(list(map(int, s)), False) for s in retain]
    random.Random(seed).shuffle(rows)
    out = []
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        L = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for r, (s, _) in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, :len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask,
                    "memorized": torch.tensor([m for _, m in chunk], dtype=torch.bool)})
    return out


def _row_ce(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token NLL and counted positions: (B,), (B,).

    Position t counts when tokens t and t+1 are real and (with ``labels``) labels[t+1] != -100.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    target = batch.get("labels", ids)[:, 1:]
    valid = (mask[:, :-1] != 0) & (mask[:, 1:] != 0) & (target != -100)
    lg = logits[:, :-1]
    lg = lg if lg.dtype in (torch.float32, torch.float64) else lg.float()
    nll = F.cross_entropy(lg.reshape(-1, logits.shape[-1]),
                          target.clamp_min(0).reshape(-1), reduction="none").view_as(target)
    return (nll * valid).sum(dim=1), valid.sum(dim=1)


def balanced_subnet_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], lam: float) -> Optional[torch.Tensor]:
    """−(1 − λ)·CE(memorized rows) + λ·CE(retain rows), each a token mean; a part with no
    counted tokens in this batch is left out (the guard). None when both are empty."""
    nll, cnt = _row_ce(logits, batch)
    mem = batch["memorized"].to(nll.device).bool()
    loss = None
    for sel, w in ((mem, -(1.0 - lam)), (~mem, lam)):
        c = cnt[sel].sum()
        if int(c) == 0 or w == 0.0:
            continue
        term = w * nll[sel].sum() / c
        loss = term if loss is None else loss + term
    return loss


@dataclass
class BalancedSubnetResult(EditResult):
    """An :class:`EditResult` plus the training history (loss, forget CE, retain CE per step)."""

    history: list[dict] = field(default_factory=list)
    skipped_batches: int = 0
    #: final mask per module, in the stored parameter's layout (0 = pruned)
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def balanced_subnet(
    model: nn.Module,
    modules: Iterable[str],
    batches: Sequence[Mapping[str, torch.Tensor]],
    p: float = 0.0015,
    lam: float = 0.7,
    epochs: int = 5,
    lr: float = 0.3,
    momentum: float = 0.9,
    progress: bool = True,
) -> BalancedSubnetResult:
    """Train a BalancedSubnet mask over ``modules`` and apply it in place (SPEC §6).

    batches: re-iterable batches with ``input_ids`` (B, L), optional ``attention_mask`` /
        ``labels``, and ``memorized`` (B,) bool — rows of the forget split are True
        (see :func:`mixed_batches`). The published best on OLMo-2 7B: p = 0.0015, λ = 0.7,
        5 epochs, lr 0.3.
    p: pruned fraction per matrix (exactly ``round(p · numel)`` weights each).
    Deterministic: the scores start at |W| and the batches are used in the given order.
    Returns a :class:`BalancedSubnetResult` (reports: pruned count and fraction, ‖ΔW‖/‖W‖;
    ``undo()`` restores the weights bit for bit). The model's parameters, ``requires_grad``
    flags and train/eval mode are as before except for the pruned weights.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"balanced_subnet: p must be in [0, 1], got {p}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"balanced_subnet: lam must be in [0, 1], got {lam}")
    targets = _targets(model, modules)
    # The stored parameter of each module (Conv1D stores Wᵀ; the mask is elementwise either way).
    params = {n: model.get_submodule(n).weight for n in targets}
    scores = {n: w.detach().abs().float().clone().requires_grad_(True) for n, w in params.items()}
    opt = torch.optim.SGD(list(scores.values()), lr=lr, momentum=momentum)
    flags = {id(q): q.requires_grad for q in model.parameters()}
    was_training = model.training
    history: list[dict] = []
    skipped = 0
    total = epochs * (len(batches) if hasattr(batches, "__len__") else 0)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=total or None, desc="balanced_subnet", disable=not progress or tqdm is None, leave=False) \
        if tqdm is not None else None
    device = next(model.parameters()).device
    try:
        for q in model.parameters():
            q.requires_grad_(False)
        model.eval()  # no dropout: the mask is the only thing that changes
        for _ in range(epochs):
            for batch in batches:
                b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                if "memorized" not in b:
                    raise KeyError("balanced_subnet: every batch needs a 'memorized' (B,) bool flag "
                                   "(build them with curvfast.baselines.mixed_batches)")
                masked = {f"{n}.weight": params[n].detach() * _StraightThroughMask.apply(scores[n], p).to(params[n].dtype)
                          for n in params}
                out = torch.func.functional_call(
                    model, masked, args=(),
                    kwargs={"input_ids": b["input_ids"], "attention_mask": b.get("attention_mask"),
                            "use_cache": False})
                logits = out["logits"] if isinstance(out, Mapping) else out.logits
                loss = balanced_subnet_loss(logits, b, lam)
                if bar is not None:
                    bar.update(1)
                if loss is None:
                    skipped += 1
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append({"loss": float(loss.detach())})
    finally:
        for q in model.parameters():
            q.requires_grad_(flags[id(q)])
        model.train(was_training)
        if bar is not None:
            bar.close()
    masks = {n: prune_mask(scores[n].detach(), p).to(w.dtype) for n, w in params.items()}
    result = BalancedSubnetResult(reports={}, _model=model, history=history, skipped_batches=skipped, masks=masks)
    with torch.no_grad():
        for n, w in params.items():
            m = masks[n]
            pruned = int((m == 0).sum())
            result.reports[n] = {"method": "balanced_subnet", "p": p, "pruned": pruned,
                                 "pruned_fraction": pruned / m.numel(), "rel_change": rel_change(w, w * m),
                                 "shape": list(targets[n].shape), "kept_mass": float("nan"),
                                 "kept_fraction": 1.0 - pruned / m.numel()}
            result._originals[n] = targets[n].detach().clone()
            w.mul_(m)
    return result
