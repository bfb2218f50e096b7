"""Fake (meta) implementations of the ops in ``curvfast._C``.

They let torch.compile / FakeTensor tracing reason about the ops without running them. Both
covariance ops only mutate their accumulators in place and return nothing, so their fake
kernels check what can be checked from metadata (shapes, dtypes, devices) and return None;
the eigensolver's fakes return empty tensors of the output shapes.
Imported by :func:`curvfast.ops._load_ext` right after ``curvfast._C`` registers the ops.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(acc: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
    torch._check(acc.dtype == torch.float32, lambda: f"accumulator must be float32, got {acc.dtype}")
    torch._check(acc.dim() == 2 and acc.shape[0] == acc.shape[1],
                 lambda: f"accumulator must be square (d, d), got {tuple(acc.shape)}")
    torch._check(x.dim() == 2 and x.shape[1] == acc.shape[0],
                 lambda: f"x must have shape (T, {acc.shape[0]}), got {tuple(x.shape)}")
    torch._check(x.dtype in _X_DTYPES, lambda: f"x must be float32, bfloat16 or float16, got {x.dtype}")
    torch._check(x.device == acc.device, lambda: f"x is on {x.device} but the accumulator is on {acc.device}")
    if weight is not None:
        torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[0],
                     lambda: f"weight must have shape ({x.shape[0]},), got {tuple(weight.shape)}")


@torch.library.register_fake("curvfast::covariance_update_")
def _covariance_update_fake(acc: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
    _check(acc, x, weight)


@torch.library.register_fake("curvfast::covariance_update_grouped_")
def _covariance_update_grouped_fake(accs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
                                    weights: Sequence[Optional[torch.Tensor]]) -> None:
    torch._check(len(accs) == len(xs), lambda: f"{len(accs)} accumulators but {len(xs)} inputs")
    torch._check(len(weights) in (0, len(xs)), lambda: f"{len(weights)} weights for {len(xs)} inputs")
    for i, (acc, x) in enumerate(zip(accs, xs)):
        _check(acc, x, weights[i] if weights else None)


def _eigh_shapes(A: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(A.dim() == 2 and A.shape[0] == A.shape[1], lambda: f"eigh needs a square matrix, got {tuple(A.shape)}")
    n = A.shape[0]
    k = top if 0 < top < n else n
    return A.new_empty((k,)), A.new_empty((n, k))


@torch.library.register_fake("curvfast::eigh_twostage")
def _eigh_twostage_fake(A: torch.Tensor, band: int = 0, top: int = 0):
    return _eigh_shapes(A, top)


@torch.library.register_fake("curvfast::eigh_twostage_batched")
def _eigh_twostage_batched_fake(As: Sequence[torch.Tensor], band: int = 0, top: int = 0, workers: int = 0):
    outs = [_eigh_shapes(A, top) for A in As]
    return [o[0] for o in outs], [o[1] for o in outs]
