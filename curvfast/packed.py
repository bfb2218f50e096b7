"""Packed lower-triangle storage of symmetric matrices: n(n+1)/2 values, row by row.

Used for factor files and for host-side accumulators, halving their size. A boolean mask of
the lower triangle (n² bytes, a quarter of the fp32 matrix) is cached per size and device;
index tensors would cost 16 bytes per kept entry.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def _lower_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()


def packed_size(n: int) -> int:
    return n * (n + 1) // 2


def pack_lower(M: torch.Tensor) -> torch.Tensor:
    """Lower triangle of a symmetric (n, n) matrix, row by row: n(n+1)/2 values."""
    return M.masked_select(_lower_mask(M.shape[0], M.device))


def unpack_lower(v: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_lower`: the full symmetric matrix."""
    if v.numel() != packed_size(n):
        raise ValueError(f"packed matrix has {v.numel()} values, expected {packed_size(n)} for n = {n}")
    L = torch.zeros(n, n, dtype=v.dtype, device=v.device).masked_scatter_(_lower_mask(n, v.device), v)
    return L + L.tril(-1).T
