"""covariance_update: acc += xᵀ diag(w) x, against float64 references.

Tolerances come from the arithmetic (flash-attention's rule): every backend's max error vs a
float64 reference must be within 2x of what plain torch's fp32 GEMM achieves on the same
(upcast) data, plus a couple of ulps of the result for tiny sums where torch is exact.
"""
from __future__ import annotations

import pytest
import torch

from curvfast import ops

_EXT_OK = ops.backend_status()["cpp"][0]
_TRITON_OK = ops.backend_status()["triton"][0]

needs_ext = pytest.mark.skipif(not _EXT_OK, reason=ops.backend_status()["cpp"][1])

BACKENDS = ["torch", pytest.param("cpp", marks=needs_ext)]
if _TRITON_OK:
    BACKENDS.append("triton")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (d, T): odd widths around every tile size, and T not a multiple of any tile or chunk.
SHAPES = [(1, 7), (17, 33), (33, 389), (1000, 777)]
TRITON_MAX_D = 64  # the Triton interpreter is slow; larger shapes belong to GPU runs


def _make(d: int, T: int, dtype: torch.dtype, weighted: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    w = torch.rand(T, generator=g) * 2 - 0.5 if weighted else None  # some negative weights
    a = torch.randn(d, d, generator=g)
    acc = a + a.T  # a symmetric running sum
    return acc, x, w


def _ref64(acc: torch.Tensor, x: torch.Tensor, w) -> torch.Tensor:
    x64 = x.double()
    xw = x64 if w is None else x64 * w.double().unsqueeze(1)
    return acc.double() + xw.T @ x64


def _tolerance(acc: torch.Tensor, x: torch.Tensor, w, ref: torch.Tensor) -> float:
    """2x the fp32 torch GEMM's own max error on the same upcast data, plus 2 ulps."""
    torch_acc = acc.clone()
    ops.covariance_update_ref(torch_acc, x, w)
    torch_err = (torch_acc.double() - ref).abs().max().item()
    ulp = torch.finfo(torch.float32).eps * ref.abs().max().item()
    return 2.0 * torch_err + 2.0 * ulp


def _check_close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"max error {err:.3e} exceeds {tol:.3e} (2x torch fp32 GEMM + 2 ulp)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,T", SHAPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_matches_float64(backend, dtype, d, T, weighted):
    if backend == "triton" and d > TRITON_MAX_D:
        pytest.skip("large shapes are too slow under the Triton interpreter")
    acc, x, w = _make(d, T, dtype, weighted)
    ref = _ref64(acc, x, w)
    tol = _tolerance(acc, x, w, ref)
    out = acc.clone()
    assert ops.covariance_update(out, x, w, backend=backend) == backend
    _check_close(out, ref, tol)
    if backend != "torch":  # the fp32 GEMM reference rounds its two triangles differently
        assert torch.equal(out, out.T), "accumulator must hold the full symmetric sum"


@needs_ext
@pytest.mark.parametrize("isa", ["avx2", "generic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_every_isa(monkeypatch, isa, dtype):
    """The lower-ISA micro-kernels (picked on CPUs without AVX-512) stay correct."""
    monkeypatch.setenv("CURVFAST_CPU_ISA", isa)
    acc, x, w = _make(67, 401, dtype, weighted=True, seed=1)
    ref = _ref64(acc, x, w)
    out = acc.clone()
    ops.covariance_update(out, x, w, backend="cpp")
    _check_close(out, ref, _tolerance(acc, x, w, ref))
    assert torch.equal(out, out.T)


@needs_ext
def test_cpp_long_batch_accuracy():
    """Many chunks of rows (T >> chunk) on a zero accumulator: the diagonal sums grow large."""
    acc, x, w = _make(256, 4099, torch.float32, weighted=False, seed=2)
    acc.zero_()
    ref = _ref64(acc, x, w)
    out = acc.clone()
    ops.covariance_update(out, x, backend="cpp")
    _check_close(out, ref, _tolerance(acc, x, w, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_is_noop(backend):
    acc, _, _ = _make(33, 1, torch.float32, False)
    out = acc.clone()
    ops.covariance_update(out, torch.empty(0, 33), backend=backend)
    ops.covariance_update(out, torch.empty(0, 33, dtype=torch.bfloat16), torch.empty(0), backend=backend)
    assert torch.equal(out, acc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_x(backend, dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(45, 2 * 40, generator=g).to(dtype)
    x = base[:, ::2]  # strided columns
    xt = torch.randn(40, 45, generator=g).to(dtype).T  # transposed storage
    for xx in (x, xt):
        assert not xx.is_contiguous()
        acc = torch.zeros(40, 40)
        ref = _ref64(acc, xx, None)
        out = acc.clone()
        ops.covariance_update(out, xx, backend=backend)
        _check_close(out, ref, _tolerance(acc, xx, None, ref))


@needs_ext
def test_op_accepts_non_contiguous_directly():
    x = torch.randn(30, 2 * 19)[:, ::2]
    out = torch.zeros(19, 19)
    torch.ops.curvfast.covariance_update_(out, x, None)
    ref = _ref64(torch.zeros(19, 19), x, None)
    _check_close(out, ref, _tolerance(torch.zeros(19, 19), x, None, ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_additive_over_batch_splits(backend):
    acc, x, w = _make(48, 300, torch.bfloat16, weighted=True, seed=4)
    whole = acc.clone()
    ops.covariance_update(whole, x, w, backend=backend)
    parts = acc.clone()
    for sl in (slice(0, 97), slice(97, 250), slice(250, 300)):
        ops.covariance_update(parts, x[sl], w[sl], backend=backend)
    ref = _ref64(acc, x, w)
    tol = 2 * _tolerance(acc, x, w, ref)
    _check_close(whole, ref, tol)
    _check_close(parts, ref, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_matches_per_matrix_reference(backend):
    specs = [(17, 50, torch.float32, False), (64, 77, torch.bfloat16, True),
             (5, 3, torch.float16, True), (33, 0, torch.float32, False)]
    accs, xs, ws, refs, tols = [], [], [], [], []
    for i, (d, T, dtype, weighted) in enumerate(specs):
        acc, x, w = _make(d, T, dtype, weighted, seed=10 + i)
        ref = _ref64(acc, x, w)
        accs.append(acc.clone())
        xs.append(x)
        ws.append(w)
        refs.append(ref)
        tols.append(_tolerance(acc, x, w, ref))
    assert ops.covariance_update_grouped(accs, xs, ws, backend=backend) == backend
    for acc, ref, tol in zip(accs, refs, tols):
        _check_close(acc, ref, tol)
        if backend != "torch":
            assert torch.equal(acc, acc.T)


@needs_ext
def test_grouped_op_matches_single_op_exactly():
    """One grouped call computes exactly what the per-matrix calls compute."""
    specs = [(100, 390, torch.float32, True), (40, 70, torch.bfloat16, False)]
    accs, xs, ws = [], [], []
    for i, (d, T, dtype, weighted) in enumerate(specs):
        acc, x, w = _make(d, T, dtype, weighted, seed=20 + i)
        accs.append(acc)
        xs.append(x)
        ws.append(w)
    single = [a.clone() for a in accs]
    for a, x, w in zip(single, xs, ws):
        torch.ops.curvfast.covariance_update_(a, x, w)
    grouped = [a.clone() for a in accs]
    torch.ops.curvfast.covariance_update_grouped_(grouped, xs, ws)
    for s, g in zip(single, grouped):
        assert torch.equal(s, g)
    # An empty weights list means "all unweighted".
    grouped_nw = [a.clone() for a in accs]
    torch.ops.curvfast.covariance_update_grouped_(grouped_nw, xs, [])
    single_nw = [a.clone() for a in accs]
    for a, x in zip(single_nw, xs):
        torch.ops.curvfast.covariance_update_(a, x, None)
    for s, g in zip(single_nw, grouped_nw):
        assert torch.equal(s, g)


@needs_ext
def test_opcheck_single():
    acc, x, w = _make(21, 19, torch.bfloat16, weighted=True)
    torch.library.opcheck(torch.ops.curvfast.covariance_update_.default, (acc, x, w))
    torch.library.opcheck(torch.ops.curvfast.covariance_update_.default, (acc.clone(), x.float(), None))


@needs_ext
def test_opcheck_grouped():
    a1, x1, w1 = _make(21, 19, torch.float32, weighted=True, seed=5)
    a2, x2, _ = _make(9, 40, torch.float16, weighted=False, seed=6)
    torch.library.opcheck(torch.ops.curvfast.covariance_update_grouped_.default,
                          ([a1, a2], [x1, x2], [w1, None]))


@needs_ext
def test_bad_inputs_raise_in_the_op():
    op = torch.ops.curvfast.covariance_update_
    x = torch.randn(8, 5)
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.zeros(5, 5, dtype=torch.float64), x, None)
    with pytest.raises(RuntimeError, match="columns"):
        op(torch.zeros(6, 6), x, None)
    with pytest.raises(RuntimeError, match="square"):
        op(torch.zeros(5, 6), x, None)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(torch.zeros(5, 5), x.double(), None)
    with pytest.raises(RuntimeError, match="weight"):
        op(torch.zeros(5, 5), x, torch.ones(7))
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.zeros(5, 10)[:, ::2], x, None)
    grouped = torch.ops.curvfast.covariance_update_grouped_
    good = torch.zeros(5, 5)
    with pytest.raises(RuntimeError, match="accumulators"):
        grouped([good], [x, x], [])
    with pytest.raises(RuntimeError, match="columns"):
        grouped([good, torch.zeros(4, 4)], [x, x], [None, None])
    assert torch.equal(good, torch.zeros(5, 5)), "a bad entry must leave every accumulator untouched"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_in_python(backend):
    x = torch.randn(8, 5)
    with pytest.raises(TypeError, match="float32"):
        ops.covariance_update(torch.zeros(5, 5, dtype=torch.float64), x, backend=backend)
    with pytest.raises(ValueError, match="shape"):
        ops.covariance_update(torch.zeros(6, 6), x, backend=backend)
    with pytest.raises(ValueError, match="inputs"):
        ops.covariance_update_grouped([torch.zeros(5, 5)], [x, x], backend=backend)
