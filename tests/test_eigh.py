"""Two-stage eigensolver (csrc/cpu/eigh_*.cpp): every stage, the whole solver, partial spectra,
the batched driver and the backend switch. Oracles: float64 torch.linalg.eigh and the plain
torch path; eigenvectors are compared by residual, orthogonality and subspaces, never by sign."""
import logging
import math
import subprocess
import sys

import pytest
import torch

import curvfast
from curvfast import eigen as eigen_mod
from curvfast.eigen import check_eigh
from curvfast.ops import BackendUnavailable

OPS = eigen_mod._twostage_ops()[0]
needs_cpp = pytest.mark.skipif(OPS is None, reason=f"two-stage solver not built: {eigen_mod._twostage_ops()[1]}")


def spd(n, kind, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    if kind == "wide":  # spectrum spanning 1e-8 .. 1
        ev = torch.logspace(-8, 0, n, dtype=torch.float64)
    elif kind == "clustered":  # two tight clusters
        ev = torch.cat([1 + 1e-7 * torch.rand(n // 2, generator=g, dtype=torch.float64),
                        1e-3 * (1 + 1e-7 * torch.rand(n - n // 2, generator=g, dtype=torch.float64))])
    elif kind == "repeated":  # exactly repeated eigenvalues
        ev = torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=torch.float64).repeat(n // 4 + 1)[:n]
    elif kind == "rankdef":  # built like a real factor: XᵀX with T < d
        x = torch.randn(max(1, n // 3), n, generator=g, dtype=torch.float64)
        return (x.T @ x / x.shape[0]).to(dtype)
    else:
        ev = torch.rand(n, generator=g, dtype=torch.float64)
    return ((q * ev) @ q.T).to(dtype)


def errors(M, evals, evecs):
    return check_eigh(M.double(), evals.double(), evecs.double())


def torch_errors(M):
    w, v = torch.linalg.eigh(M)
    return errors(M, w, v)


KINDS = ["random", "wide", "clustered", "repeated", "rankdef"]


# ------------------------------------------------------------------------------ whole solver
@needs_cpp
@pytest.mark.parametrize("n", [1, 2, 33, 500])
@pytest.mark.parametrize("kind", KINDS)
def test_twostage_fp32_bars(n, kind):
    M = spd(n, kind)
    evals, evecs = eigen_mod.eigh_twostage(M)  # unchecked: no fallback can hide an error
    assert evals.dtype == torch.float32 and evecs.shape == (n, n)
    assert (evals[1:] <= evals[:-1]).all()
    res, orth = errors(M, evals, evecs)
    assert res <= 1e-5 and orth <= 1e-5, (res, orth)
    # within a small multiple of what LAPACK achieves in the same dtype
    t_res, t_orth = torch_errors(M)
    assert res <= 10 * t_res + 1e-6 and orth <= 10 * t_orth + 1e-6, (res, orth, t_res, t_orth)
    ref = torch.linalg.eigvalsh(M.double()).flip(0)
    assert float((evals.double() - ref).abs().max()) <= 1e-5 * max(float(ref.abs().max()), 1e-30)


@needs_cpp
@pytest.mark.parametrize("n,kind", [(2, "random"), (33, "wide"), (200, "clustered"), (500, "rankdef")])
def test_twostage_fp64(n, kind):
    M = spd(n, kind, dtype=torch.float64)
    evals, evecs = eigen_mod.eigh_twostage(M)
    assert evals.dtype == torch.float64
    res, orth = errors(M, evals, evecs)
    assert res <= 1e-13 and orth <= 1e-13, (res, orth)
    ref = torch.linalg.eigvalsh(M).flip(0)
    assert float((evals - ref).abs().max()) <= 1e-13 * float(ref.abs().max())


@needs_cpp
def test_twostage_n2048_rank_deficient_factor():
    M = spd(2048, "rankdef", seed=3)
    evals, evecs = curvfast.eigh(M, backend="cpp", check=False)
    res, orth = errors(M, evals, evecs)
    assert res <= 1e-5 and orth <= 1e-5, (res, orth)
    ref = torch.linalg.eigvalsh(M.double()).flip(0)
    assert float((evals.double() - ref).abs().max()) <= 1e-5 * float(ref[0])


@needs_cpp
@pytest.mark.parametrize("band", [1, 2, 7, 40])
def test_twostage_any_bandwidth_and_noncontiguous(band):
    M = spd(97, "random", seed=1).T  # a transposed view
    evals, evecs = OPS.eigh_twostage(M, band, 0)
    res, orth = errors(M, evals, evecs)
    assert res <= 1e-5 and orth <= 1e-5


# ------------------------------------------------------------------------------ stages
@needs_cpp
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
@pytest.mark.parametrize("n,b", [(3, 1), (50, 4), (130, 16), (64, 63), (600, 8), (777, 40)])
@pytest.mark.parametrize("lower_only", [True, False], ids=["lower", "whole"])
def test_stage_dense_to_band(dtype, tol, n, b, lower_only):
    # (600, 8), (777, 40): several 256-column blocks of the lower-triangle trailing update (the
    # CPU's); "whole": one GEMM per update (the CUDA path's)
    A = spd(n, "random", seed=n, dtype=dtype)
    B, Q1 = OPS.eigh_sy2sb(A, b, lower_only)
    i = torch.arange(n)
    outside = B[(i[:, None] - i[None, :]).abs() > b]
    assert outside.numel() == 0 or float(outside.abs().max()) == 0  # banded
    assert torch.equal(B, B.T)  # the band is mirrored exactly
    assert float((Q1 @ B @ Q1.T - A).norm() / A.norm()) <= tol
    assert float((Q1.T @ Q1 - torch.eye(n, dtype=dtype)).norm()) / math.sqrt(n) <= tol


@needs_cpp
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
@pytest.mark.parametrize("n,b", [(2, 1), (40, 3), (150, 16), (33, 32), (600, 16)])
def test_stage_band_to_tridiagonal(dtype, tol, n, b):
    A = spd(n, "wide", seed=n, dtype=dtype)
    B, _ = OPS.eigh_sy2sb(A, b)
    d, e, Q2 = OPS.eigh_sb2st(B, b)
    T = torch.diag(d) + torch.diag(e, 1) + torch.diag(e, -1)
    assert float((Q2 @ T @ Q2.T - B).norm() / B.norm()) <= tol
    assert float((Q2.T @ Q2 - torch.eye(n, dtype=dtype)).norm()) / math.sqrt(n) <= tol


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pipelined_chase_is_the_sequential_chase(dtype):
    """Two workers chase consecutive sweeps in a pipeline (n ≥ 16b); every entry must see the
    same operations in the same order as with one worker, so the results are bit for bit equal."""
    n, b = 700, 16
    B, _ = OPS.eigh_sy2sb(spd(n, "wide", seed=7, dtype=dtype), b)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.eigh_sb2st(B, b)
        torch.set_num_threads(2)
        runs = [OPS.eigh_sb2st(B, b) for _ in range(3)]
    finally:
        torch.set_num_threads(before)
    for two in runs:
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def tridiagonals():
    g = torch.Generator().manual_seed(0)
    yield "random", torch.randn(300, generator=g, dtype=torch.float64), torch.randn(299, generator=g, dtype=torch.float64)
    w = torch.tensor([abs(10 - i) for i in range(21)], dtype=torch.float64)  # Wilkinson W21+, glued
    yield "glued_wilkinson", torch.cat([w] * 10), torch.cat([torch.ones(20, dtype=torch.float64), torch.tensor([1e-8])] * 10)[:-1]
    yield "constant", torch.full((200,), 2.0, dtype=torch.float64), torch.full((199,), 1e-12, dtype=torch.float64)
    e = torch.randn(255, generator=g, dtype=torch.float64)
    e[::7] = 0  # decoupled blocks
    yield "split", torch.randn(256, generator=g, dtype=torch.float64), e
    yield "graded", torch.logspace(-10, 0, 180, dtype=torch.float64), torch.logspace(-11, -1, 179, dtype=torch.float64)
    yield "one", torch.tensor([3.0], dtype=torch.float64), torch.zeros(0, dtype=torch.float64)


@needs_cpp
@pytest.mark.parametrize("case", list(tridiagonals()), ids=lambda c: c[0])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_stage_tridiagonal_divide_and_conquer(case, dtype, tol):
    _, d, e = case
    n = d.numel()
    w, Z = OPS.eigh_stedc(d.to(dtype), e.to(dtype))
    T = (torch.diag(d) + torch.diag(e, 1) + torch.diag(e, -1)).to(dtype)
    assert (w[1:] >= w[:-1]).all()
    res, orth = errors(T, w, Z)
    assert res <= tol and orth <= tol, (res, orth)
    ref = torch.linalg.eigvalsh(T.double())
    assert float((w.double() - ref).abs().max()) <= tol * float(ref.abs().max())


def mirrored_halves():
    """Two equal halves joined by a coupling of 0.5: every eigenvalue of one half is one of the
    other's, so the top merge deflates by rotating a top-half column into a bottom-half one."""
    g = torch.Generator().manual_seed(3)
    d1, e1 = torch.randn(150, generator=g, dtype=torch.float64), torch.randn(149, generator=g, dtype=torch.float64)
    return "mirrored", torch.cat([d1, d1]), torch.cat([e1, torch.tensor([0.5], dtype=torch.float64), e1])


def expected_leaves(n, depth, leaf=48):
    """Sizes of the subproblems stedc_factored solves whole: halves (top one n // 2) until the
    depth is used up or a half is a D&C leaf (<= 48 rows)."""
    if depth == 0 or n <= leaf:
        return [n]
    return expected_leaves(n // 2, depth - 1, leaf) + expected_leaves(n - n // 2, depth - 1, leaf)


@needs_cpp
@pytest.mark.parametrize("case", [*tridiagonals(), mirrored_halves()], ids=lambda c: c[0])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
@pytest.mark.parametrize("top,depth", [(0, 1), (37, 1), (0, 3), (37, 2)])
def test_stage_tridiagonal_factored_merges(case, dtype, tol, top, depth):
    # The merges of the top `depth` levels left as products (the CUDA solver forms them on the
    # GPU): the formed Z is an eigenbasis of T, and it agrees with the plain D&C (vectors up to
    # sign). At depth 1 the eigenvalues are the same bits (same merges, same arithmetic); deeper,
    # the tear vectors come from matrix-vector products instead of GEMM rows: equal to rounding.
    _, d, e = case
    n = d.numel()
    k = min(top, n) if top > 0 else n
    w, Z, leaves = OPS.eigh_stedc_factored(d.to(dtype), e.to(dtype), top, depth)
    assert leaves.tolist() == expected_leaves(n, depth)
    assert w.shape == (k,) and Z.shape == (n, k) and (w[:-1] >= w[1:]).all()
    T = torch.diag(d) + torch.diag(e, 1) + torch.diag(e, -1)
    Zd = Z.double()
    res = float((T @ Zd - Zd * w.double()).norm() / T.norm())
    orth = float((Zd.T @ Zd - torch.eye(k, dtype=torch.float64)).norm()) / math.sqrt(k)
    assert res <= tol and orth <= tol, (res, orth)
    w_full, Z_full = OPS.eigh_stedc(d.to(dtype), e.to(dtype))
    if depth == 1:
        assert torch.equal(w, w_full.flip(0)[:k])
    wd = w_full.flip(0).double()
    assert float((w.double() - wd[:k]).abs().max()) <= tol * float(wd.abs().max())
    gaps = torch.cat([(wd[:-1] - wd[1:]).abs(), torch.tensor([math.inf], dtype=torch.float64)])
    simple = gaps[:k] > 1e-3
    simple[1:] &= gaps[:k - 1] > 1e-3
    assert torch.allclose(Zd[:, simple].abs(), Z_full.flip(1)[:, :k][:, simple].double().abs(), atol=50 * tol)


# ------------------------------------------------------------------------------ partial spectrum
def assert_top_equal(M, full, part, k):
    (wf, vf), (wp, vp) = full, part
    assert wp.shape == (k,) and vp.shape == (M.shape[0], k)
    scale = float(wf.abs().max())
    assert float((wp.double() - wf[:k].double()).abs().max()) <= 1e-5 * scale
    # Same invariant subspace: the kept vectors have no component along the full solution's
    # vectors outside its top k, up to the ratio of rounding to the eigengap after k.
    gap = float(wf[k - 1] - wf[k]) if k < wf.numel() else scale
    leak = float((vf[:, k:].double().T @ vp.double()).norm())
    assert leak <= 1e-5 * scale / max(gap, 1e-30) + 1e-5
    # where eigenvalues are simple and well separated, vectors agree up to sign
    sep = torch.ones(k, dtype=torch.bool)
    wd = wf.double()
    for i in range(k):
        nb = torch.cat([wd[max(i - 1, 0):i], wd[i + 1:i + 2]])
        sep[i] = bool((nb - wd[i]).abs().min() > 1e-3 * scale) if nb.numel() else True
    cos = (vf[:, :k].double() * vp.double()).sum(0).abs()
    assert bool((cos[sep] > 1 - 1e-5).all())


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("kind,k", [("random", 10), ("repeated", 8), ("rankdef", 40), ("wide", 1)])
def test_top_k_equals_full(backend, kind, k):
    M = spd(160, kind, seed=5)
    full = curvfast.eigh(M, backend=backend)
    part = curvfast.eigh(M, backend=backend, top=k)
    assert_top_equal(M, full, part, k)
    res, orth = errors(M, *part)
    assert res <= 1e-5 and orth <= 1e-5
    w, v = curvfast.eigh(M, backend=backend, top=500)  # top >= n: the full decomposition
    assert v.shape == (160, 160)


@needs_cpp
def test_top_k_large_threaded_path():
    # n above the serial cutoff: stage 3 splits over threads and returns only the top k columns
    # (largest first) while another thread builds the stage-2 blocks.
    M = spd(1100, "rankdef", seed=7)
    full = OPS.eigh_twostage(M, 0, 0)
    part = OPS.eigh_twostage(M, 0, 12)
    assert_top_equal(M, full, part, 12)
    for w, v in (full, part):
        assert (w[1:] <= w[:-1]).all()
        res, orth = errors(M, w, v)
        assert res <= 1e-5 and orth <= 1e-5, (res, orth)


def test_spectrum_top_and_bad_top():
    M = spd(40, "rankdef")
    s = eigen_mod.spectrum(M, top=5)
    assert s.evals.shape == (5,) and s.evecs.shape == (40, 5)
    with pytest.raises(ValueError, match="top"):
        curvfast.eigh(M, top=-1)


# ------------------------------------------------------------------------------ batched driver
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("workers", [1, 2])
def test_batched_matches_single(backend, workers):
    sizes = [1, 33, 200, 2, 120, 200]
    Ms = [spd(n, KINDS[i % len(KINDS)], seed=i) for i, n in enumerate(sizes)]
    out = curvfast.eigh_batched(Ms, backend=backend, workers=workers, names=[f"m{i}" for i in range(len(Ms))])
    assert len(out) == len(Ms)
    for M, (w, v) in zip(Ms, out):
        assert v.shape == M.shape
        ref = torch.linalg.eigvalsh(M.double()).flip(0)
        assert float((w.double() - ref).abs().max()) <= 1e-5 * max(float(ref.abs().max()), 1e-30)
        res, orth = errors(M, w, v)
        assert res <= 1e-5 and orth <= 1e-5


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_batched_top_and_empty(backend):
    assert curvfast.eigh_batched([], backend=backend) == []
    Ms = [spd(60, "random", seed=1), spd(90, "rankdef", seed=2)]
    out = curvfast.eigh_batched(Ms, backend=backend, top=[3, None])
    assert out[0][1].shape == (60, 3) and out[1][1].shape == (90, 90)
    with pytest.raises(ValueError, match="NaN"):
        curvfast.eigh_batched([Ms[0], torch.full((3, 3), float("nan"))], backend=backend)


@needs_cpp
def test_batched_bad_result_falls_back_alone(monkeypatch, caplog):
    Ms = [spd(50, "random", seed=1), spd(70, "wide", seed=2)]
    real = OPS.eigh_twostage_batched

    class Broken:
        def __getattr__(self, name):
            return getattr(OPS, name)

        def eigh_twostage_batched(self, As, band, top, workers):
            ws, zs = real(As, band, top, workers)
            zs[1] = torch.roll(zs[1], 1, dims=1)  # orthogonal, but wrong
            return ws, zs

    monkeypatch.setattr(eigen_mod, "_twostage_ops", lambda: (Broken(), "built"))
    with caplog.at_level(logging.WARNING, logger="curvfast"):
        out = curvfast.eigh_batched(Ms, backend="cpp", names=["ok", "G of layer 3"])
    assert "G of layer 3" in caplog.text and "ok" not in caplog.text.replace("ok,", "")
    for M, (w, v) in zip(Ms, out):
        res, orth = errors(M, w, v)
        assert res <= 1e-5 and orth <= 1e-5


# ------------------------------------------------------------------------------ backend switch
def test_backend_switch_errors():
    M = spd(8, "random")
    with pytest.raises(ValueError, match="unknown eigh backend"):
        curvfast.eigh(M, backend="lapack")
    with pytest.raises(BackendUnavailable, match="cuda"):
        curvfast.eigh(M, backend="cuda")
    assert eigen_mod.resolve_eigh_backend("auto", torch.device("cpu"), 100) == "torch"
    assert eigen_mod.resolve_eigh_backend("torch", torch.device("cpu"), 10**5) == "torch"
    # auto follows the measurements: MKL below n ≈ 3000 and for batches; the C++ solver for large
    # single matrices and for partial spectra of n ≥ 2048 (when it is built); torch on GPUs
    auto = lambda *a, **k: eigen_mod.resolve_eigh_backend("auto", *a, **k)  # noqa: E731
    cpu = torch.device("cpu")
    assert auto(cpu, 2048) == "torch" and auto(cpu, 1024, top=100) == "torch"
    assert auto(cpu, 8192, batched=True) == "torch" and auto(cpu, 2048, top=1024) == "torch"
    assert auto(torch.device("cuda"), 8192) == "torch"
    built = "cpp" if OPS is not None else "torch"
    assert auto(cpu, 4096) == built and auto(cpu, 2048, top=204) == built
    if OPS is not None:
        assert eigen_mod.resolve_eigh_backend("cpp", cpu, 2048, top=100) == "cpp"
    status = eigen_mod.eigh_backend_status()
    assert set(status) == {"torch", "cpp", "cuda"} and status["torch"][0]


@pytest.mark.parametrize("setting", ["high", "medium", "highest"])
def test_full_fp32_matmul_turns_tf32_off_and_restores(setting):
    # TF32 (allow_tf32 / precision "high") would cost the CUDA solver and the accuracy check
    # three digits: inside, full precision; after, exactly the caller's setting, also on error.
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        with eigen_mod.full_fp32_matmul(torch.device("cuda")):
            assert torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == setting
        with pytest.raises(KeyError):
            with eigen_mod.full_fp32_matmul(torch.device("cuda")):
                raise KeyError("inside")
        assert torch.get_float32_matmul_precision() == setting
        with eigen_mod.full_fp32_matmul(torch.device("cpu")):  # CPU solves are not TF32: untouched
            assert torch.get_float32_matmul_precision() == setting
    finally:
        torch.set_float32_matmul_precision(before)


def test_full_fp32_matmul_leaves_a_mixed_api_state_alone():
    # torch refuses to read the precision once its legacy and new APIs were mixed: warn, touch
    # nothing, run (in a subprocess: the mixed state cannot be undone in this one).
    code = (
        "import logging, torch\n"
        "from curvfast import eigen\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "ran = False\n"
        "with eigen.full_fp32_matmul(torch.device('cuda')):\n"
        "    ran = True\n"
        "assert ran and torch.backends.cuda.matmul.fp32_precision == 'tf32'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "cannot read the float32 matmul precision" in run.stderr


@needs_cpp
def test_cpp_backend_rejects_nan_and_falls_back(monkeypatch, caplog):
    with pytest.raises(ValueError, match="NaN"):
        curvfast.eigh(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), backend="cpp")
    M = spd(40, "wide")
    monkeypatch.setattr(eigen_mod, "eigh_twostage",
                        lambda W, top=None: (torch.ones(W.shape[0], dtype=W.dtype), torch.eye(W.shape[0], dtype=W.dtype)))
    with caplog.at_level(logging.WARNING, logger="curvfast"):
        w, v = curvfast.eigh(M, backend="cpp", name="A of layer 9")
    assert "A of layer 9" in caplog.text
    res, orth = errors(M, w, v)
    assert res <= 1e-5 and orth <= 1e-5


@needs_cpp
def test_eigendecompose_with_cpp_backend():
    from tiny_models import lm_batch, make

    model = make("llama")
    fs = curvfast.collect_factors(model, [lm_batch()], modules="mlp", fisher="true", seed=0, progress=False)
    es = curvfast.eigendecompose(fs, progress=False, backend="cpp", workers=2)
    ref = curvfast.eigendecompose(fs, progress=False, backend="torch")
    assert es.meta["eigen_backend"] == "cpp"
    for name, e in es.items():
        f = fs[name]
        for evals, evecs, M, r in ((e.evals_G, e.evecs_G, f.G, ref[name].evals_G), (e.evals_A, e.evecs_A, f.A, ref[name].evals_A)):
            assert (evals >= 0).all()
            assert float(((evecs * evals) @ evecs.T - M).norm() / M.norm()) < 1e-4
            assert float((evals - r).abs().max()) <= 1e-5 * float(r.max())


def test_eigh_twostage_opcheck():
    import curvfast.ops  # noqa: F401  (loads the extension and its fake kernels)

    curvfast.ops._load_ext()
    A = torch.randn(40, 40, dtype=torch.float64)
    A = A @ A.T
    torch.library.opcheck(torch.ops.curvfast.eigh_twostage.default, (A, 0, 0))
    torch.library.opcheck(torch.ops.curvfast.eigh_twostage.default, (A.float(), 8, 5))
    torch.library.opcheck(torch.ops.curvfast.eigh_twostage_batched.default, ([A, A[:20, :20].contiguous()], 0, 0, 1))
