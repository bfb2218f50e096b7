"""Eigenbases of the K-FAC factors: A = U_A diag(μ) U_Aᵀ, G = U_G diag(λ) U_Gᵀ, descending.

Every decomposition is checked after the fact (residual ‖MQ − QΛ‖_F/‖M‖_F and orthogonality
‖QᵀQ − I‖_F/√n); a failed or inaccurate solve is retried in float64, then on the CPU, then with
a tiny diagonal shift, each step logged with the module name. A job never dies at this step
for numerical reasons.

Solvers (``backend=``): ``"torch"`` is torch.linalg.eigh (LAPACK/MKL on CPU, cuSOLVER on CUDA),
the reference and the fallback; ``"cpp"`` is the blocked two-stage solver of curvfast._C
(csrc/cpu/eigh_*.cpp: dense -> band -> tridiagonal -> divide and conquer, GEMM
back-transformations), which also serves partial spectra (``top=k``) at ~k/n of the
back-transformation cost and batches (several decompositions in flight, largest first);
``"cuda"`` is the same two-stage solver on CUDA tensors (csrc/cuda/eigh_*.cu: band reduction with
cuSOLVER/cuBLAS, bulge chasing as a CUDA kernel, D&C with its secular equations on the host and
its merge products on the GPU, GEMM back-transformations; batches on several streams), available
when curvfast._C was built with CUDA; its GEMMs run in full float32 whatever the TF32 setting
(:func:`full_fp32_matmul`). ``"auto"`` picks
by measurement (benchmarks/results/cpu_eigh.json, idle 2-core host, fp32): on the CPU the C++
solver for single decompositions with n ≥ 3072 (n = 4096: 0.80-1.05x MKL's time, as MKL's own
time varies from run to run) and for partial spectra with n ≥ 2048 and top ≤ n/4 (top 10% at
2048: 0.75-0.81x MKL's full solve); torch otherwise (MKL is faster below n ≈ 3000, 1.22-1.29x at
2048, and for batches of small matrices, 1.05-1.29x), and
always on GPUs until the CUDA path has been measured there. A solve that fails or misses the
accuracy check falls back to torch (see :func:`eigh`).
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
import os
from typing import Any, Optional, Sequence, Union

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


@contextlib.contextmanager
def full_fp32_matmul(device: torch.device) -> Iterator[None]:
    """float32 GEMMs in full precision on CUDA for the duration (no TF32, no bf16), the caller's
    setting restored after. Under torch.backends.cuda.matmul.allow_tf32 or
    set_float32_matmul_precision("high") an eigensolver's GEMMs and the accuracy check lose three
    digits: every fp32 solve would fail the check and go to the float64 fallback. Uses the setting
    that allow_tf32 and set_float32_matmul_precision share; a state torch refuses to read (its
    legacy and new precision APIs mixed) is left alone, with a warning. The setting is
    process-wide: other threads' GEMMs run in full precision meanwhile."""
    if torch.device(device).type != "cuda":
        yield
        return
    try:
        prev = torch.get_float32_matmul_precision()
    except RuntimeError as e:
        log.warning("curvfast: cannot read the float32 matmul precision (%s); eigendecompositions run "
                    "with the current setting, and TF32 there fails their accuracy check", e)
        yield
        return
    if prev == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def check_eigh(M: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor) -> tuple[float, float]:
    """(relative residual ‖MQ − QΛ‖_F/‖M‖_F, orthogonality ‖QᵀQ − I‖_F/√k), computed in the
    decomposition's dtype (full-precision float32 GEMMs on CUDA, whatever the TF32 setting).
    evecs: (n, k), k = n for a full decomposition, k < n for a partial one."""
    n = evecs.shape[1] if evecs.dim() == 2 else M.shape[0]
    if n == 0 or M.shape[0] == 0:
        return 0.0, 0.0
    M = M.to(evecs.dtype)
    with full_fp32_matmul(evecs.device):
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


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------
EIGH_BACKENDS = ("auto", "torch", "cpp", "cuda")
#: "auto" on the CPU: the C++ solver from this size (full spectrum) / this size with top ≤ n/4
CPP_AUTO_MIN_N = 3072
CPP_AUTO_MIN_N_TOP = 2048


def _twostage_ops():
    """torch.ops.curvfast two-stage ops, or None with the reason. ``CURVFAST_EIGH_LIB`` may name a
    separately built library with the same ops (development builds of csrc/cpu/eigh_*.cpp)."""
    from curvfast.ops import _load_ext

    ext, why = _load_ext()
    if not hasattr(torch.ops.curvfast, "eigh_twostage"):
        lib = os.environ.get("CURVFAST_EIGH_LIB")
        if lib:
            torch.ops.load_library(lib)
    if hasattr(torch.ops.curvfast, "eigh_twostage"):
        return torch.ops.curvfast, "built"
    if ext is None:
        return None, why
    return None, ("curvfast._C was built without the two-stage eigensolver (csrc/cpu/eigh_*.cpp); "
                  "rebuild with `pip install -e . --no-build-isolation`")


def _cuda_status(op, why: str) -> tuple[bool, str]:
    if op is None:
        return False, why
    if not torch._C._dispatch_has_kernel_for_dispatch_key("curvfast::eigh_twostage", "CUDA"):
        return False, ("curvfast._C was built without the CUDA two-stage eigensolver (csrc/cuda/eigh_*.cu); "
                       "reinstall with a CUDA build of torch and CURVFAST_CUDA=1, or use backend='torch' (cuSOLVER)")
    if not torch.cuda.is_available():
        return False, "the CUDA two-stage eigensolver is compiled, but no CUDA device is visible"
    return True, "two-stage solver in curvfast._C (CUDA)"


def eigh_backend_status() -> dict[str, tuple[bool, str]]:
    """Map eigh backend -> (available, reason)."""
    op, why = _twostage_ops()
    return {"torch": (True, f"torch.linalg.eigh, torch {torch.__version__}"),
            "cpp": (op is not None, "two-stage solver in curvfast._C" if op is not None else why),
            "cuda": _cuda_status(op, why)}


def resolve_eigh_backend(backend: str, device: torch.device, n: int, top: Optional[int] = None,
                         batched: bool = False) -> str:
    """The solver that serves an (n, n) decomposition on ``device`` for the requested backend."""
    if backend not in EIGH_BACKENDS:
        raise ValueError(f"unknown eigh backend {backend!r}; choose one of {EIGH_BACKENDS}")
    if backend == "auto":
        if device.type != "cpu" or batched or eigh_backend_status()["cpp"][0] is False:
            return "torch"
        if n >= CPP_AUTO_MIN_N or (top is not None and n >= CPP_AUTO_MIN_N_TOP and top <= n // 4):
            return "cpp"
        return "torch"
    if backend == "torch":
        return "torch"
    from curvfast.ops import BackendUnavailable

    ok, why = eigh_backend_status()[backend]
    if not ok:
        raise BackendUnavailable(f"eigh backend {backend!r} is unavailable: {why}")
    if backend == "cpp" and device.type != "cpu":
        raise BackendUnavailable(f"eigh backend 'cpp' runs on CPU tensors, got {device.type}; "
                                 "use backend='auto' or move the matrix to the CPU")
    if backend == "cuda" and device.type != "cuda":
        raise BackendUnavailable(f"eigh backend 'cuda' runs on CUDA tensors, got {device.type}; "
                                 "use backend='cpp' or 'auto', or move the matrix to the GPU")
    return backend


def eigh_twostage(M: torch.Tensor, top: Optional[int] = None, band: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-stage solver, unchecked. M: (n, n) float32/float64 on the CPU (C++ solver) or a
    CUDA device (CUDA solver, when built). Returns evals (k,) descending and evecs (n, k), k = top or n."""
    op, why = _twostage_ops()
    if op is None:
        from curvfast.ops import BackendUnavailable

        raise BackendUnavailable(f"eigh backend {'cuda' if M.is_cuda else 'cpp'!r} is unavailable: {why}")
    with full_fp32_matmul(M.device):
        return op.eigh_twostage(M, band, int(top or 0))


def _solve(work: torch.Tensor, solver: str, top: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if solver in ("cpp", "cuda"):
        return eigh_twostage(work, top)
    evals, evecs = eigh_ref(work)
    if top is not None:
        evals, evecs = evals[:top], evecs[:, :top]
    return evals, evecs


def _top(top: Optional[int], n: int) -> Optional[int]:
    if top is None:
        return None
    if not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be a non-negative int or None, got {top!r}")
    return None if top >= n else top


def eigh(M: torch.Tensor, dtype: Optional[torch.dtype] = None, check: bool = True,
         name: str = "matrix", backend: str = "auto", top: Optional[int] = None,
         _first: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition, eigenvalues descending, verified.

    M: (n, n) symmetric (only the symmetric part is used). dtype: working/returned dtype
    (default: M's dtype if floating, upgraded to float32 from half types).
    backend: "auto" | "torch" | "cpp" | "cuda" (see the module docstring).
    top: only the ``top`` largest eigenpairs (evals (top,), evecs (n, top)); the same numbers as
    the full decomposition's leading part (up to sign of each vector and rotations within
    repeated eigenvalues).
    Returns (evals (k,), evecs (n, k)) with M evecs ≈ evecs diag(evals), k = top or n.
    Fallback chain on failure or inaccuracy: the chosen solver → float64 (torch) → CPU float64
    → CPU float64 with a tiny diagonal shift. Raises EigenError only if all of them fail.
    """
    _validate(M, name)
    out_dtype = dtype or (M.dtype if M.dtype in (torch.float32, torch.float64) else torch.float32)
    n = M.shape[0]
    top = _top(top, n)
    solver = resolve_eigh_backend(backend, M.device, n, top)
    Ms = (M + M.T) * 0.5
    attempts = [(out_dtype, M.device, 0.0, solver)]
    if out_dtype != torch.float64:
        attempts.append((torch.float64, M.device, 0.0, "torch"))
    if M.device.type != "cpu":
        attempts.append((torch.float64, torch.device("cpu"), 0.0, "torch"))
    scale = float(Ms.diagonal().abs().max()) if n else 0.0
    attempts.append((torch.float64, torch.device("cpu"), max(scale, 1e-30) * 1e-12 * n, "torch"))
    last = ""
    for i, (dt, dev, shift, how) in enumerate(attempts):
        work = Ms.to(device=dev, dtype=dt)
        if shift:
            work = work + shift * torch.eye(n, dtype=dt, device=dev)
        try:
            if i == 0 and _first is not None:
                evals, evecs = _first
            else:
                evals, evecs = _solve(work, how, top)
        except (torch.linalg.LinAlgError, RuntimeError) as e:
            last = f"{how} {dt} on {dev}: {e}"
            log.warning("curvfast: eigh of %s failed (%s); trying the next fallback", name, last)
            continue
        if shift:
            evals = evals - shift
        if check:
            res, orth = check_eigh(Ms.to(device=dev, dtype=dt), evals, evecs)
            tol = tolerance(out_dtype, n)
            if not (res <= tol and orth <= tol):
                last = f"{how} {dt} on {dev}: residual {res:.2e}, orthogonality {orth:.2e} > {tol:.1e}"
                log.warning("curvfast: eigh of %s inaccurate (%s); trying the next fallback", name, last)
                continue
        if i > 0:
            log.warning("curvfast: eigh of %s succeeded with fallback %d (%s on %s%s)", name, i, dt, dev,
                        f", shift {shift:.1e}" if shift else "")
        return evals.to(device=M.device, dtype=out_dtype), evecs.to(device=M.device, dtype=out_dtype)
    raise EigenError(f"{name}: every eigensolver in the fallback chain failed; last: {last}")


def eigh_batched(Ms: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None, check: bool = True,
                 names: Optional[Sequence[str]] = None, backend: str = "auto",
                 top: Union[None, int, Sequence[Optional[int]]] = None,
                 workers: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`eigh` of many matrices (any sizes), several in flight at once.

    Ms: list of (n_i, n_i) symmetric matrices. top: None, one int for all, or one per matrix.
    workers: decompositions in flight for the C++ solver (0: one per core); each gets its share of
    the cores; jobs start largest first (n³ cost). Every result is checked and goes through
    :func:`eigh`'s fallback chain on its own, so one bad matrix does not fail the batch.
    Returns [(evals (k_i,), evecs (n_i, k_i))] in the input order.
    """
    Ms = list(Ms)
    names = list(names) if names is not None else [f"matrix {i}" for i in range(len(Ms))]
    if len(names) != len(Ms):
        raise ValueError(f"{len(Ms)} matrices but {len(names)} names")
    tops = list(top) if isinstance(top, (list, tuple)) else [top] * len(Ms)
    if len(tops) != len(Ms):
        raise ValueError(f"{len(Ms)} matrices but {len(tops)} top values")
    for M, nm in zip(Ms, names):
        _validate(M, nm)
    out: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(Ms)
    solvers = [resolve_eigh_backend(backend, M.device, M.shape[0], _top(t, M.shape[0]), batched=len(Ms) > 1)
               for M, t in zip(Ms, tops)]
    # Two-stage batch (C++: worker threads; CUDA: streams): one call per (device, dtype, top);
    # results then verified one by one.
    cpp = [i for i, s in enumerate(solvers) if s in ("cpp", "cuda")]
    firsts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if cpp:
        op, _ = _twostage_ops()
        groups: dict[tuple[torch.device, torch.dtype, int], list[int]] = {}
        for i in cpp:
            dt = dtype or (Ms[i].dtype if Ms[i].dtype in (torch.float32, torch.float64) else torch.float32)
            groups.setdefault((Ms[i].device, dt, _top(tops[i], Ms[i].shape[0]) or 0), []).append(i)
        for (_, dt, k), idx in groups.items():
            work = [((Ms[i] + Ms[i].T) * 0.5).to(dt) for i in idx]
            try:
                with full_fp32_matmul(work[0].device):
                    ws, zs = op.eigh_twostage_batched(work, 0, k, workers)
            except RuntimeError as e:
                log.warning("curvfast: batched eigh failed (%s); decomposing one by one", e)
                continue
            for i, w, z in zip(idx, ws, zs):
                firsts[i] = (w, z)
    order = sorted(range(len(Ms)), key=lambda i: -Ms[i].shape[0])  # largest first
    for i in order:
        out[i] = eigh(Ms[i], dtype=dtype, check=check, name=names[i], backend=solvers[i], top=tops[i],
                      _first=firsts.get(i))
    return out  # type: ignore[return-value]


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


def _clamped(evals: torch.Tensor, evecs: torch.Tensor) -> Spectrum:
    clamped = int((evals < 0).sum())
    if clamped:
        evals = evals.clamp(min=0)
    return Spectrum(evals, evecs, clamped)


def spectrum(M: torch.Tensor, dtype: Optional[torch.dtype] = None, name: str = "matrix",
             backend: str = "auto", top: Optional[int] = None) -> Spectrum:
    """Decompose a PSD factor and clamp its negative rounding-level eigenvalues to zero.
    top: keep only the leading ``top`` eigenpairs (see :func:`eigh`)."""
    return _clamped(*eigh(M, dtype=dtype, name=name, backend=backend, top=top))


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
                   progress: bool = True, backend: str = "auto", workers: int = 0) -> EigenSet:
    """Eigendecompose every factor of a FactorSet; a shared A is decomposed once.

    dtype: solver and storage dtype (float64 is more accurate for tiny eigenvalues of
    ill-conditioned factors). device: where to solve (default: where the factors are).
    backend: eigh backend (see :func:`eigh`). With ``"cpp"`` (``"cuda"``) all factors are decomposed
    as one batch by the two-stage solver (``workers`` threads / streams in flight, largest first);
    otherwise one by one, largest first, with :func:`spectrum`.
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
        works = [M if device is None else M.to(device) for _, _, M in jobs]
        batch = [i for i, w in enumerate(works)
                 if backend in ("cpp", "cuda") and resolve_eigh_backend(backend, w.device, w.shape[0]) == backend]
        if batch:
            res = eigh_batched([works[i] for i in batch], dtype=dtype, backend=backend, workers=workers,
                               names=[f"{jobs[i][0]} of {jobs[i][1]}" for i in batch])
            for i, r in zip(batch, res):
                done[(jobs[i][0], jobs[i][1])] = _clamped(*r)
                if bar is not None:
                    bar.update(jobs[i][2].shape[0] ** 3)
        for i, (kind, key, M) in enumerate(jobs):
            if (kind, key) in done:
                continue
            if backend == "auto":
                done[(kind, key)] = spectrum(works[i], dtype=dtype, name=f"{kind} of {key}")
            else:
                done[(kind, key)] = spectrum(works[i], dtype=dtype, name=f"{kind} of {key}", backend=backend)
            if bar is not None:
                bar.update(M.shape[0] ** 3)
    finally:
        if bar is not None:
            bar.close()
    bases = {name: Eigenbasis(A=done[("A", f.a_key)], G=done[("G", name)], a_key=f.a_key, tokens=f.tokens)
             for name, f in factors.items()}
    meta = dict(getattr(factors, "meta", {}) or {})
    meta.update({"eigen_dtype": str(dtype).replace("torch.", ""), "eigen_backend": backend,
                 "curvfast_version": __version__})
    return EigenSet(bases, meta)
