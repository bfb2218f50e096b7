"""Backend registry for curvfast's compute ops.

Every op has a plain-torch reference (``*_ref``) with the same signature: it is the fallback
on any device and the test oracle. Fast backends register here, in one place:

- ``"torch"``  plain torch (always available)
- ``"cpp"``    the C++ extension ``curvfast._C`` on CPU tensors
- ``"cuda"``   CUDA kernels compiled into ``curvfast._C`` (CUDA tensors)
- ``"triton"`` Triton kernels in ``curvfast.kernels`` (CUDA tensors, or CPU under
               ``TRITON_INTERPRET=1`` for testing)

``backend="auto"`` picks the fastest available for the tensors' device; an explicit request
that cannot be served raises :class:`BackendUnavailable` saying how to fix it.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch

BACKENDS = ("torch", "cpp", "cuda", "triton")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve this call."""


# --------------------------------------------------------------------------------------
# Availability probes (cached; `curvfast info` prints them)
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _load_ext():
    try:
        from curvfast import _C  # noqa: F401  (registers torch.ops.curvfast.*)
        from curvfast import _meta  # noqa: F401  (fake kernels for torch.compile / opcheck)
    except ImportError as e:
        return None, f"curvfast._C could not be imported ({e}); reinstall with `pip install -e . --no-build-isolation`"
    return _C, "built"


@functools.lru_cache(maxsize=None)
def _load_triton():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return None, f"triton is not installed ({e}); `pip install triton`"
    try:
        from curvfast import kernels
    except ImportError as e:
        return None, f"curvfast.kernels could not be imported ({e})"
    return kernels, f"triton {triton.__version__}"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_status() -> dict[str, tuple[bool, str]]:
    """Map backend name -> (available, reason) for this process."""
    status: dict[str, tuple[bool, str]] = {"torch": (True, f"torch {torch.__version__}")}
    ext, why = _load_ext()
    status["cpp"] = (ext is not None, why)
    if ext is None:
        status["cuda"] = (False, why)
    elif not ext.with_cuda():
        from curvfast import build_info

        status["cuda"] = (False, f"extension built without CUDA ({build_info().get('cuda_reason')}); "
                          "reinstall with a CUDA build of torch and CURVFAST_CUDA=1")
    elif not torch.cuda.is_available():
        status["cuda"] = (False, "compiled, but no CUDA device is visible")
    else:
        status["cuda"] = (True, "compiled and a CUDA device is visible")
    kern, why = _load_triton()
    if kern is None:
        status["triton"] = (False, why)
    elif torch.cuda.is_available():
        status["triton"] = (True, why)
    elif triton_interpreted():
        status["triton"] = (True, why + " (interpreter, TRITON_INTERPRET=1: for tests, slow)")
    else:
        status["triton"] = (False, why + " installed, but no CUDA device (set TRITON_INTERPRET=1 to test on CPU)")
    return status


def _device_ok(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return False


# Preference order per device for `auto`. Triton under the interpreter is never auto-picked.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return the backend that will serve a call on ``device``."""
    if backend == "auto":
        status = backend_status()
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if status[name][0] and _device_ok(name, device):
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    ok, why = backend_status()[backend]
    if not ok:
        raise BackendUnavailable(f"backend {backend!r} is unavailable: {why}")
    if not _device_ok(backend, device):
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device.type} tensors; "
                                 "use backend='auto' or move the tensors")
    return backend


# --------------------------------------------------------------------------------------
# covariance_update: acc += x^T diag(w) x
# --------------------------------------------------------------------------------------
def _check_covariance_args(acc: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
    if acc.dtype != torch.float32:
        raise TypeError(f"accumulator must be float32, got {acc.dtype}")
    if acc.dim() != 2 or acc.shape[0] != acc.shape[1]:
        raise ValueError(f"accumulator must be square (d, d), got {tuple(acc.shape)}")
    if x.dim() != 2 or x.shape[1] != acc.shape[0]:
        raise ValueError(f"x must have shape (T, {acc.shape[0]}), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.device != acc.device:
        raise ValueError(f"x is on {x.device} but the accumulator is on {acc.device}")
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != x.shape[0]):
        raise ValueError(f"weight must have shape ({x.shape[0]},), got {tuple(weight.shape)}")


def covariance_update_ref(acc: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
    """Reference: ``acc += xᵀ diag(weight) x`` with an fp32 GEMM.

    acc: (d, d) float32, updated in place (full symmetric). x: (T, d) fp32/bf16/fp16.
    weight: optional (T,) per-row weights.
    """
    _check_covariance_args(acc, x, weight)
    xf = x.float()
    xw = xf if weight is None else xf * weight.float().unsqueeze(1)
    acc.addmm_(xw.t(), xf)


def covariance_update(acc: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                      backend: str = "auto") -> str:
    """``acc += xᵀ diag(weight) x`` into an fp32 accumulator; returns the backend used.

    acc: (d, d) float32 contiguous, holds the full symmetric sum afterwards.
    x: (T, d) float32, bfloat16 or float16 (read in its own dtype, widened in the kernel).
    weight: optional (T,) per-row weights (masks, sampling weights).
    """
    _check_covariance_args(acc, x, weight)
    name = resolve_backend(backend, x.device)
    if name == "torch":
        covariance_update_ref(acc, x, weight)
    elif name in ("cpp", "cuda"):
        torch.ops.curvfast.covariance_update_(acc, x.contiguous(), weight)
    else:
        _load_triton()[0].covariance_update(acc, x, weight)
    return name


def covariance_update_grouped_ref(accs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
                                  weights: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
    """Reference for the grouped form: ``accs[i] += xs[i]ᵀ diag(weights[i]) xs[i]`` for every i."""
    if len(accs) != len(xs):
        raise ValueError(f"{len(accs)} accumulators but {len(xs)} inputs")
    weights = [None] * len(xs) if weights is None else list(weights)
    for acc, x, w in zip(accs, xs, weights):
        covariance_update_ref(acc, x, w)


def covariance_update_grouped(accs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
                              weights: Optional[Sequence[Optional[torch.Tensor]]] = None,
                              backend: str = "auto") -> str:
    """Grouped :func:`covariance_update`: several accumulators (any sizes) in one call."""
    if len(accs) != len(xs):
        raise ValueError(f"{len(accs)} accumulators but {len(xs)} inputs")
    if not accs:
        return "torch"
    weights = [None] * len(xs) if weights is None else list(weights)
    for acc, x, w in zip(accs, xs, weights):
        _check_covariance_args(acc, x, w)
    name = resolve_backend(backend, xs[0].device)
    if name == "torch":
        covariance_update_grouped_ref(accs, xs, weights)
    elif name in ("cpp", "cuda"):
        grouped = getattr(torch.ops.curvfast, "covariance_update_grouped_", None)
        if grouped is None:
            for acc, x, w in zip(accs, xs, weights):
                torch.ops.curvfast.covariance_update_(acc, x.contiguous(), w)
        else:
            grouped(list(accs), [x.contiguous() for x in xs], weights)
    else:
        _load_triton()[0].covariance_update_grouped(list(accs), list(xs), weights)
    return name
