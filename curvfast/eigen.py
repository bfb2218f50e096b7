"""Eigenbases of the K-FAC factors: A = U_A diag(μ) U_Aᵀ, G = U_G diag(λ) U_Gᵀ, descending.

Every decomposition is checked after the fact (residual ‖MQ − QΛ‖_F/‖M‖_F and orthogonality
‖QᵀQ − I‖_F/√n); a failed or inaccurate solve is retried in float64, then on the CPU, then with
a tiny diagonal shift, each step logged with the module name. A job never dies at this step
for numerical reasons.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from curvfast import __version__

log = logging.getLogger("curvfast")


class EigenError(RuntimeError):
    """No solver in the fallback chain produced an accurate decomposition."""


def tolerance(dtype: torch.dtype, n: int) -> float:
    """Acceptance bound for residual and orthogonality: a small multiple of the unit roundoff
    growth of a backward-stable solver, never looser than 1e-3."""
    eps = torch.finfo(dtype).eps
    return min(1e-3, max(1e-5 if dtype == torch.float32 else 1e-12, 50 * eps * math.sqrt(max(n, 1))))


def eigh_ref(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: torch.linalg.eigh, eigenvalues reordered descending."""
    evals, evecs = torch.linalg.eigh(M)
    return evals.flip(0), evecs.flip(1)


def check_eigh(M: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor) -> tuple[float, float]:
    """(relative residual ‖MQ − QΛ‖_F/‖M‖_F, orthogonality ‖QᵀQ − I‖_F/√n), computed in the
    decomposition's dtype."""
    n = M.shape[0]
    if n == 0:
        return 0.0, 0.0
    M = M.to(evecs.dtype)
    norm = float(torch.linalg.matrix_norm(M))
    res = float(torch.linalg.matrix_norm(M @ evecs - evecs * evals.unsqueeze(0)))
    res = res / norm if norm > 0 else res
    eye = torch.eye(n, dtype=evecs.dtype, device=evecs.device)
    orth = float(torch.linalg.matrix_norm(evecs.T @ evecs - eye)) / math.sqrt(n)
    return res, orth


def _validate(M: torch.Tensor, name: str) -> None:
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name}: eigh needs a square matrix, got shape {tuple(M.shape)}")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name}: matrix contains NaN/Inf; cannot decompose it")


def eigh(M: torch.Tensor, dtype: Optional[torch.dtype] = None, check: bool = True,
         name: str = "matrix") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition, eigenvalues descending, verified.

    M: (n, n) symmetric (only the symmetric part is used). dtype: working/returned dtype
    (default: M's dtype if floating, upgraded to float32 from half types).
    Returns (evals (n,), evecs (n, n)) with M ≈ evecs diag(evals) evecsᵀ.
    Fallback chain on failure or inaccuracy: float64 → CPU float64 → CPU float64 with a tiny
    diagonal shift. Raises EigenError only if all of them fail.
    """
    _validate(M, name)
    out_dtype = dtype or (M.dtype if M.dtype in (torch.float32, torch.float64) else torch.float32)
    n = M.shape[0]
    Ms = (M + M.T) * 0.5
    attempts = [(out_dtype, M.device, 0.0)]
    if out_dtype != torch.float64:
        attempts.append((torch.float64, M.device, 0.0))
    if M.device.type != "cpu":
        attempts.append((torch.float64, torch.device("cpu"), 0.0))
    scale = float(Ms.diagonal().abs().max()) if n else 0.0
    attempts.append((torch.float64, torch.device("cpu"), max(scale, 1e-30) * 1e-12 * n))
    last = ""
    for i, (dt, dev, shift) in enumerate(attempts):
        work = Ms.to(device=dev, dtype=dt)
        if shift:
            work = work + shift * torch.eye(n, dtype=dt, device=dev)
        try:
            evals, evecs = eigh_ref(work)
        except (torch.linalg.LinAlgError, RuntimeError) as e:
            last = f"{dt} on {dev}: {e}"
            log.warning("curvfast: eigh of %s failed (%s); trying the next fallback", name, last)
            continue
        if shift:
            evals = evals - shift
        if check:
            res, orth = check_eigh(Ms.to(device=dev, dtype=dt), evals, evecs)
            tol = tolerance(out_dtype, n)
            if not (res <= tol and orth <= tol):
                last = f"{dt} on {dev}: residual {res:.2e}, orthogonality {orth:.2e} > {tol:.1e}"
                log.warning("curvfast: eigh of %s inaccurate (%s); trying the next fallback", name, last)
                continue
        if i > 0:
            log.warning("curvfast: eigh of %s succeeded with fallback %d (%s on %s%s)", name, i, dt, dev,
                        f", shift {shift:.1e}" if shift else "")
        return evals.to(device=M.device, dtype=out_dtype), evecs.to(device=M.device, dtype=out_dtype)
    raise EigenError(f"{name}: every eigensolver in the fallback chain failed; last: {last}")


@dataclass
class Spectrum:
    """Eigen-pairs of one factor, plus diagnostics."""

    evals: torch.Tensor  # (n,) descending, ≥ 0 after clamping
    evecs: torch.Tensor  # (n, n) columns are eigenvectors
    clamped: int = 0  # negative rounding-level eigenvalues set to 0

    def diagnostics(self) -> dict[str, float]:
        ev = self.evals.double()
        top = float(ev[0]) if ev.numel() else 0.0
        pos = ev[ev > 0]
        p = ev / ev.sum() if float(ev.sum()) > 0 else ev
        nz = p[p > 0]
        eff_rank = float(torch.exp(-(nz * nz.log()).sum())) if nz.numel() else 0.0
        return {"n": ev.numel(), "max": top, "min_positive": float(pos.min()) if pos.numel() else 0.0,
                "condition": top / float(pos.min()) if pos.numel() else math.inf,
                "effective_rank": eff_rank, "zeros": int((ev == 0).sum()), "clamped": self.clamped}


def spectrum(M: torch.Tensor, dtype: Optional[torch.dtype] = None, name: str = "matrix") -> Spectrum:
    """Decompose a PSD factor and clamp its negative rounding-level eigenvalues to zero."""
    evals, evecs = eigh(M, dtype=dtype, name=name)
    neg = evals < 0
    clamped = int(neg.sum())
    if clamped:
        evals = evals.clamp(min=0)
    return Spectrum(evals, evecs, clamped)


@dataclass
class Eigenbasis:
    """Eigenbases of one weight's factors. ``A`` may be shared with other modules."""

    A: Spectrum
    G: Spectrum
    a_key: str
    tokens: int = 0

    @property
    def evals_A(self) -> torch.Tensor:
        return self.A.evals

    @property
    def evecs_A(self) -> torch.Tensor:
        return self.A.evecs

    @property
    def evals_G(self) -> torch.Tensor:
        return self.G.evals

    @property
    def evecs_G(self) -> torch.Tensor:
        return self.G.evecs


@dataclass
class EigenSet(Mapping):
    """Mapping from module name to :class:`Eigenbasis`, plus the factors' metadata."""

    bases: dict[str, Eigenbasis]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Eigenbasis:
        return self.bases[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.bases)

    def __len__(self) -> int:
        return len(self.bases)

    def __repr__(self) -> str:
        return f"EigenSet({len(self)} modules, tokens={self.meta.get('tokens')})"


def eigendecompose(factors: Mapping, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                   progress: bool = True) -> EigenSet:
    """Eigendecompose every factor of a FactorSet; a shared A is decomposed once.

    dtype: solver and storage dtype (float64 is more accurate for tiny eigenvalues of
    ill-conditioned factors). device: where to solve (default: where the factors are).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    jobs: list[tuple[str, str, torch.Tensor]] = []
    seen_a: set[str] = set()
    for name, f in factors.items():
        if f.a_key not in seen_a:
            seen_a.add(f.a_key)
            jobs.append(("A", f.a_key, f.A))
        jobs.append(("G", name, f.G))
    jobs.sort(key=lambda j: -j[2].shape[0])  # largest first: the progress bar's ETA is honest
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(j[2].shape[0] ** 3 for j in jobs), desc="eigendecompose", unit="n³",
                   unit_scale=True, dynamic_ncols=True)
    done: dict[tuple[str, str], Spectrum] = {}
    try:
        for kind, key, M in jobs:
            work = M if device is None else M.to(device)
            done[(kind, key)] = spectrum(work, dtype=dtype, name=f"{kind} of {key}")
            if bar is not None:
                bar.update(M.shape[0] ** 3)
    finally:
        if bar is not None:
            bar.close()
    bases = {name: Eigenbasis(A=done[("A", f.a_key)], G=done[("G", name)], a_key=f.a_key, tokens=f.tokens)
             for name, f in factors.items()}
    meta = dict(getattr(factors, "meta", {}) or {})
    meta.update({"eigen_dtype": str(dtype).replace("torch.", ""), "curvfast_version": __version__})
    return EigenSet(bases, meta)
