"""The curvature-mass keep-set (SPEC §2.5).

Component (i, j) of a weight in the K-FAC eigenbasis has curvature Π_ij = λ_i μ_j. The keep-set
for a fraction ρ takes components in descending order of Π until their summed Π reaches
ρ · (Σλ)(Σμ); ties are taken in row-major (i, j) order, which is what a pair-by-pair heap of
(-Π, i, j) does. Because λ and μ are sorted descending the keep-set is a staircase: row i
keeps j < k[i], k non-increasing. We find it exactly with a threshold search on Π, without
enumerating pairs: O((m + n) log n · 64) work instead of O(mn log mn).
"""
from __future__ import annotations

import torch


def _check_spectrum(v: torch.Tensor, name: str) -> torch.Tensor:
    if v.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(v.shape)}")
    v = v.detach().to("cpu", torch.float64)
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains NaN/Inf")
    if v.numel() and (v < 0).any():
        raise ValueError(f"{name} has negative entries (min {v.min().item():.3g}); clamp rounding-level "
                         "negatives to 0 first (eigendecompose does)")
    if v.numel() > 1 and (v[1:] > v[:-1]).any():
        raise ValueError(f"{name} must be sorted in descending order")
    return v


def _counts_ge(lam: torch.Tensor, mu: torch.Tensor, tau: float, strict: bool) -> torch.Tensor:
    """For each row i, #{j : λ_i μ_j ≥ τ} (or > τ), with the products rounded exactly as the
    pair-by-pair definition rounds them.

    A search on μ against τ/λ_i lands within a rounding step of the answer; the products at the
    boundary then decide, jumping over runs of equal μ so ties move together.
    """
    n = mu.numel()
    neg_mu = -mu  # ascending, for searchsorted
    with torch.no_grad():
        ratio = torch.where(lam > 0, tau / lam, torch.full_like(lam, float("inf")))
        c = torch.searchsorted(neg_mu, -ratio, right=not strict)

        def holds(j: torch.Tensor) -> torch.Tensor:
            prod = lam * mu[j.clamp(0, n - 1)]
            return (prod > tau) if strict else (prod >= tau)

        for _ in range(64):
            back = (c > 0) & ~holds(c - 1)  # the last kept pair fails: drop its whole run
            fwd = (c < n) & holds(c)  # the first dropped pair holds: take its whole run
            if not (back.any() or fwd.any()):
                return c
            c = torch.where(back, torch.searchsorted(neg_mu, -mu[(c - 1).clamp(0, n - 1)], right=False), c)
            c = torch.where(fwd & ~back, torch.searchsorted(neg_mu, -mu[c.clamp(0, n - 1)], right=True), c)
    raise RuntimeError("keep-set search did not settle")  # pragma: no cover


def _mass(lam: torch.Tensor, mu_prefix: torch.Tensor, counts: torch.Tensor) -> float:
    return float((lam * mu_prefix[counts]).sum())


def keep_counts(evals_G: torch.Tensor, evals_A: torch.Tensor, rho: float) -> torch.Tensor:
    """Staircase keep-set for curvature-mass fraction ``rho``.

    evals_G: (d_out,) λ descending ≥ 0; evals_A: (d_in,) μ descending ≥ 0.
    Returns int64 k of length d_out: row i keeps eigen-pairs j < k[i] (k non-increasing).
    ρ ≥ 1 keeps everything, ρ ≤ 0 nothing; with zero total mass nothing is needed, so nothing
    is kept for ρ < 1.
    """
    lam = _check_spectrum(evals_G, "evals_G")
    mu = _check_spectrum(evals_A, "evals_A")
    m, n = lam.numel(), mu.numel()
    rho = float(rho)
    if rho >= 1.0:
        return torch.full((m,), n, dtype=torch.int64)
    if rho <= 0.0 or m == 0 or n == 0:
        return torch.zeros(m, dtype=torch.int64)
    mu_prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(mu, 0)])
    target = rho * float(lam.sum()) * float(mu.sum())
    if target <= 0.0:
        return torch.zeros(m, dtype=torch.int64)

    def reaches(tau: float) -> bool:
        return _mass(lam, mu_prefix, _counts_ge(lam, mu, tau, strict=False)) >= target

    # Largest τ with mass(Π ≥ τ) ≥ target. Positive doubles order like their bit patterns,
    # so bisect on the int64 view: exact in 64 steps, and the answer is a product value.
    top = float(lam[0] * mu[0])
    if reaches(top):
        v = top
    else:
        lo_bits = 0  # bits of 0.0: mass(Π ≥ 0) = total ≥ target
        hi_bits = int(torch.tensor(top, dtype=torch.float64).view(torch.int64))
        while hi_bits - lo_bits > 1:
            mid = (lo_bits + hi_bits) // 2
            if reaches(float(torch.tensor(mid, dtype=torch.int64).view(torch.float64))):
                lo_bits = mid
            else:
                hi_bits = mid
        v = float(torch.tensor(lo_bits, dtype=torch.int64).view(torch.float64))
    k_gt = _counts_ge(lam, mu, v, strict=True)
    if v <= 0.0:
        return k_gt  # the positive pairs already hold the mass (up to rounding)
    k_ge = _counts_ge(lam, mu, v, strict=False)
    need = target - _mass(lam, mu_prefix, k_gt)
    # Tied pairs at v are taken row by row (row-major order) until the mass is reached.
    ties = k_ge - k_gt
    base = _mass(lam, mu_prefix, k_gt)
    q = max(0, int(-(-need // v)))  # ceil(need / v), then fix rounding either way
    while q > 0 and base + (q - 1) * v >= target:
        q -= 1
    while base + q * v < target and q < int(ties.sum()):
        q += 1
    before = torch.cumsum(ties, 0) - ties
    take = (q - before).clamp(min=0)
    return k_gt + torch.minimum(ties, take)


def keep_mask(k: torch.Tensor, d_in: int, device=None) -> torch.Tensor:
    """Boolean (d_out, d_in) mask of the staircase: M[i, j] = j < k[i]."""
    cols = torch.arange(d_in, device=device)
    return cols.unsqueeze(0) < k.to(device).unsqueeze(1)


def kept_mass(evals_G: torch.Tensor, evals_A: torch.Tensor, k: torch.Tensor) -> float:
    """Fraction of the total curvature mass held by the keep-set k."""
    lam = evals_G.detach().to("cpu", torch.float64)
    mu = evals_A.detach().to("cpu", torch.float64)
    total = float(lam.sum() * mu.sum())
    if total == 0.0:
        return 1.0
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(mu, 0)])
    return _mass(lam, prefix, k.cpu()) / total
