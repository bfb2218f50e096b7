"""The CUDA bulge-chasing algorithm, run on the CPU (torch.ops.curvfast.eigh_sb2st_emulate).

The emulation executes the kernel's window phases (csrc/cpu/eigh_chase.h, shared with
csrc/cuda/eigh_bulge.cu) with the kernel's thread partition, the kernel's sweep pipeline
(ticket + progress counters) on real threads, its blocked reflector record and the blocked
back-transformation that the CUDA driver runs on the GPU. Oracles: the sequential sb2st stage
(csrc/cpu/eigh_bulge.cpp) and float64 eigenvalues; Q2 is checked by ‖Q2 T Q2ᵀ − B‖/‖B‖ and
orthogonality, never by signs.
"""
import math

import pytest
import torch

from curvfast import eigen as eigen_mod

OPS = eigen_mod._twostage_ops()[0]
HAVE = OPS is not None and hasattr(OPS, "eigh_sb2st_emulate")
pytestmark = pytest.mark.skipif(not HAVE, reason="curvfast._C built without eigh_sb2st_emulate (rebuild the extension)")


def band_matrix(n, b, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = (A + A.T) / 2
    i = torch.arange(n)
    A = A * ((i[:, None] - i[None, :]).abs() <= b)
    return A.to(dtype)


def tridiag(d, e):
    return torch.diag(d) + torch.diag(e, 1) + torch.diag(e, -1)


def unit(dtype):
    return torch.finfo(dtype).eps


CASES = [(1, 1), (2, 1), (5, 2), (17, 3), (33, 4), (64, 8), (100, 7), (257, 16), (300, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,b", CASES)
def test_emulated_chase_reduces_band(n, b, dtype):
    B = band_matrix(n, b, dtype, seed=n + b)
    d, e, Q, V, tau = OPS.eigh_sb2st_emulate(B, b, 1, 32)
    assert d.shape == (n,) and e.shape == (max(n - 1, 0),) and Q.shape == (n, n)
    Bd, Qd = B.double(), Q.double()
    T = tridiag(d.double(), e.double())
    nb = max(float(Bd.norm()), 1e-300)
    # tolerance from the arithmetic: ~n reflectors per entry, each O(b) flops at unit roundoff u
    tol = 20 * unit(dtype) * math.sqrt(n * b + 1) * max(1, math.log2(n + 1))
    assert float((Qd @ T @ Qd.T - Bd).norm()) / nb <= tol
    assert float((Qd.T @ Qd - torch.eye(n, dtype=torch.float64)).norm()) / math.sqrt(n) <= tol
    # same tridiagonal spectrum as the input band
    ref = torch.linalg.eigvalsh(Bd)
    got = torch.linalg.eigvalsh(T)
    assert float((ref - got).abs().max()) <= tol * nb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,b", [(33, 4), (100, 7), (257, 16)])
def test_emulated_chase_matches_sequential_sb2st(n, b, dtype):
    B = band_matrix(n, b, dtype, seed=7)
    d, e, Q, _, _ = OPS.eigh_sb2st_emulate(B, b, 1, 32)
    d0, e0, Q0 = OPS.eigh_sb2st(B, b)
    # Both are backward stable, but the entries of a tridiagonal form are not forward stable:
    # roundoff of a different summation order grows along the chase (fp32: up to ~1e-2 at the end
    # of d). So: the spectra agree to roundoff, and in float64 the entries agree closely too.
    scale = float(B.double().norm())
    tol = 50 * unit(dtype) * math.sqrt(n * b) * scale
    w = torch.linalg.eigvalsh(tridiag(d.double(), e.double()))
    w0 = torch.linalg.eigvalsh(tridiag(d0.double(), e0.double()))
    assert float((w - w0).abs().max()) <= tol
    if dtype == torch.float64:
        assert float((d - d0).abs().max()) <= 1e-9 * scale
        assert float((e.abs() - e0.abs()).abs().max()) <= 1e-9 * scale
        # Q2 agrees up to the sign of each column (signs of e may differ)
        sign = torch.sign((Q * Q0).sum(0))
        assert float((Q * sign - Q0).abs().max()) <= 1e-9


@pytest.mark.parametrize("threads", [1, 7, 64])
def test_thread_partition_changes_only_summation_order(threads):
    n, b = 80, 9
    B = band_matrix(n, b, torch.float64, seed=3)
    d, e, Q, _, _ = OPS.eigh_sb2st_emulate(B, b, 1, threads)
    d0, e0, Q0, _, _ = OPS.eigh_sb2st_emulate(B, b, 1, 32)
    # float64: roundoff differences grow along the chase (entries are not forward stable) but
    # stay far below anything a wrong partition would give
    assert float((d - d0).abs().max()) <= 1e-9 * float(B.norm())
    sign = torch.sign((Q * Q0).sum(0))
    assert float((Q * sign - Q0).abs().max()) <= 1e-9
    w = torch.linalg.eigvalsh(tridiag(d, e))
    assert float((w - torch.linalg.eigvalsh(B)).abs().max()) <= 1e-12 * float(B.norm())


@pytest.mark.parametrize("n,b,workers", [(150, 4, 2), (160, 16, 4), (97, 3, 6), (60, 1, 3), (50, 2, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pipelined_sweeps_are_bitwise_sequential(n, b, workers, dtype):
    """The pipelining rule (step s of sweep j waits for min(s+3, steps) steps of sweep j-1) gives
    every entry the same operation sequence as one sweep at a time: results are bitwise equal
    for any number of sweeps in flight. A race would show up here as a mismatch."""
    B = band_matrix(n, b, dtype, seed=workers)
    ref = OPS.eigh_sb2st_emulate(B, b, 1, 32)
    for _ in range(2):
        got = OPS.eigh_sb2st_emulate(B, b, workers, 32)
        for r, g in zip(ref, got):
            assert torch.equal(r, g)


def test_record_layout():
    """Block g = gfirst[J] + s, column t = sweep J*b + t, v[0] = 1 on row t; blocks count
    sum_J ceil((n-1-J*b)/b)."""
    n, b = 50, 6
    B = band_matrix(n, b, torch.float64, seed=1)
    _, _, _, V, tau = OPS.eigh_sb2st_emulate(B, b, 1, 32)
    steps = lambda j: (n - 1 - j + b - 1) // b  # noqa: E731
    G = sum(steps(J * b) for J in range((n - 1 + b - 1) // b))
    assert V.shape == (G, 2 * b, b) and tau.shape == (G, b)
    g = 0
    for J in range((n - 1 + b - 1) // b):
        for s in range(steps(J * b)):
            for t in range(b):
                j = J * b + t
                if j < n - 1 and s < steps(j) and tau[g, t] != 0:
                    assert V[g, t, t] == 1 and (V[g, :t, t] == 0).all()
            g += 1


def test_emulated_stage_in_full_pipeline():
    """dense -> band (sy2sb) -> emulated chase -> D&C -> both back-transformations: the path of
    the CUDA driver, with the CPU stages standing in for their GPU twins."""
    n, b = 160, 8
    g = torch.Generator().manual_seed(5)
    X = torch.randn(n // 2, n, generator=g, dtype=torch.float64)
    A = (X.T @ X / n).float()
    Bb, Q1 = OPS.eigh_sy2sb(A, b)
    d, e, Q2, _, _ = OPS.eigh_sb2st_emulate(Bb, b, 4, 32)
    w, Z = OPS.eigh_stedc(d, e)
    Q = Q1.double() @ Q2.double() @ Z.double()
    res = float((A.double() @ Q - Q * w.double()).norm() / A.double().norm())
    orth = float((Q.T @ Q - torch.eye(n, dtype=torch.float64)).norm()) / math.sqrt(n)
    assert res <= 1e-5 and orth <= 1e-5, (res, orth)


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="square"):
        OPS.eigh_sb2st_emulate(torch.zeros(3, 4), 2, 1, 32)
    with pytest.raises(RuntimeError, match="threads"):
        OPS.eigh_sb2st_emulate(torch.zeros(4, 4), 2, 1, 0)


# ------------------------------------------------------------------ the CUDA driver's sequence
from test_eigh import spd  # noqa: E402  (the same test matrices as the CPU solver)


@pytest.mark.parametrize("n,band", [(1, 0), (2, 0), (33, 8), (150, 8), (500, 0)])
@pytest.mark.parametrize("kind", ["random", "wide", "repeated", "rankdef"])
def test_cuda_driver_sequence_fp32_bars(n, band, kind):
    """eigh_twostage_blocked (the CUDA driver's stages) with the emulated kernel (128 threads per
    block, 4 blocks in flight): the issue's fp32 bars, eigenvalues vs float64."""
    M = spd(n, kind)
    evals, evecs = OPS.eigh_twostage_emulate(M, band, 0, 4, 128)  # band 0: the driver's default
    assert evals.dtype == torch.float32 and evecs.shape == (n, n)
    assert (evals[1:] <= evals[:-1]).all()
    Md = M.double()
    Q = evecs.double()
    res = float((Md @ Q - Q * evals.double()).norm() / Md.norm())
    orth = float((Q.T @ Q - torch.eye(n, dtype=torch.float64)).norm()) / math.sqrt(n)
    assert res <= 1e-5 and orth <= 1e-5, (res, orth)
    ref = torch.linalg.eigvalsh(Md).flip(0)
    assert float((evals.double() - ref).abs().max()) <= 1e-5 * max(float(ref.abs().max()), 1e-30)


@pytest.mark.parametrize("kind", ["random", "wide", "rankdef"])
def test_cuda_driver_sequence_as_accurate_as_lapack(kind):
    """The GPU bar asks for equal or better accuracy than torch.linalg.eigh. On the CPU the same
    comparison holds against LAPACK (MKL), in float32: residual and orthogonality within 1.3x.
    It takes the choices made for it: the chase and Q2 in double, deflation below float32's eps
    (with float32 chase and deflation at float32's eps the residual was 2.1x MKL's for "wide")."""
    n = 700
    M = spd(n, kind, seed=5)
    Md = M.double()

    def accuracy(evals, evecs):
        Q = evecs.double()
        res = float((Md @ Q - Q * evals.double()).norm() / Md.norm())
        return res, float((Q.T @ Q - torch.eye(n, dtype=torch.float64)).norm()) / math.sqrt(n)

    ours = accuracy(*OPS.eigh_twostage_emulate(M, 0, 0, 4, 128))
    lapack = accuracy(*torch.linalg.eigh(M))
    assert ours[0] <= 1.3 * lapack[0] and ours[1] <= 1.3 * lapack[1], (ours, lapack)


def test_cuda_driver_sequence_top_and_fp64():
    M = spd(120, "wide", dtype=torch.float64)
    w, Z = OPS.eigh_twostage_emulate(M, 6, 0, 3, 64)
    wk, Zk = OPS.eigh_twostage_emulate(M, 6, 10, 3, 64)
    assert wk.shape == (10,) and Zk.shape == (120, 10)
    assert torch.equal(wk, w[:10])  # same pipeline, bitwise, whatever runs in flight
    assert float((M @ Z - Z * w).norm() / M.norm()) <= 1e-13
    ref = torch.linalg.eigvalsh(M).flip(0)
    assert float((w - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
    # the leading subspace of the partial solve equals the full one
    P, Pk = Z[:, :10] @ Z[:, :10].T, Zk @ Zk.T
    assert float((P - Pk).norm()) <= 1e-10


# ------------------------------------------------------------------ on a GPU (skipped here)
def _cuda_solver():
    return (torch.cuda.is_available()
            and torch._C._dispatch_has_kernel_for_dispatch_key("curvfast::eigh_twostage", "CUDA"))


needs_cuda = pytest.mark.skipif(not (HAVE and _cuda_solver()),
                                reason="needs a CUDA device and curvfast._C built with CUDA")


@needs_cuda
@pytest.mark.parametrize("n,band", [(1, 0), (2, 0), (33, 8), (500, 0), (2048, 0)])
@pytest.mark.parametrize("kind", ["random", "wide", "rankdef"])
def test_cuda_kernel_bars_and_emulation(n, band, kind):
    """The CUDA solver on the device: the fp32 bars, and the same eigenvalues as its CPU emulation
    (identical schedule; only FMA contraction differs)."""
    M = spd(n, kind)
    w, Z = torch.ops.curvfast.eigh_twostage(M.cuda(), band, 0)
    assert w.is_cuda and Z.shape == (n, n)
    Md, Q = M.double(), Z.double().cpu()
    res = float((Md @ Q - Q * w.double().cpu()).norm() / Md.norm())
    orth = float((Q.T @ Q - torch.eye(n, dtype=torch.float64)).norm()) / math.sqrt(n)
    assert res <= 1e-5 and orth <= 1e-5, (res, orth)
    if n <= 500:
        we, _ = OPS.eigh_twostage_emulate(M, band, 0, 4, 128)
        assert float((w.cpu().double() - we.double()).abs().max()) <= 1e-5 * float(we.abs().max())


@needs_cuda
def test_cuda_batched_streams_match_single():
    Ms = [spd(n, "rankdef", seed=n).cuda() for n in (300, 64, 1000, 300, 5)]
    ws, zs = torch.ops.curvfast.eigh_twostage_batched(Ms, 0, 0, 3)
    for M, w, z in zip(Ms, ws, zs):
        w1, _ = torch.ops.curvfast.eigh_twostage(M, 0, 0)
        assert torch.allclose(w, w1, rtol=0, atol=1e-6 * float(w1.abs().max()))
        res = float((M.double() @ z.double() - z.double() * w.double()).norm() / M.double().norm())
        assert res <= 1e-5
