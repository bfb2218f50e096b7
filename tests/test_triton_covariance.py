"""Triton covariance kernel (acc += xᵀ diag(w) x) against float64, on CPU under the interpreter
and, where a GPU is visible and TRITON_INTERPRET=0, on CUDA tensors.

Tolerance rule (flash-attention's): the kernel's error vs float64 must be within 2x of the error
of an fp32 GEMM on the same upcast data (plus a few fp32 ulps of slack for near-exact cases).
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from curvfast import kernels  # noqa: E402
from curvfast import ops  # noqa: E402
from curvfast.kernels import Config  # noqa: E402
from curvfast.kernels.covariance import _tiles_of  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
if not INTERPRET and not ON_GPU:
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SMALL = Config(32, 16, 32, 1, 1)  # many tiles, rectangular, tiles straddling the diagonal
SPLIT = Config(32, 32, 32, 1, 1, splits=3)  # split over T with atomics


def _inputs(T, d, dtype, weighted, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, d, generator=g) + 0.3).to(dtype).to(device)
    w = torch.rand(T, generator=g).to(device) * 3 if weighted else None
    a = torch.randn(d, d, generator=g)
    acc = (a + a.T).to(device)  # exactly symmetric start
    return acc, x, w


def _errors(acc0, x, w, out):
    """(relative error of out, relative error of the fp32 GEMM reference), both vs float64."""
    xd = x.double()
    exact = acc0.double() + (xd.T * (1 if w is None else w.double())) @ xd
    ref = acc0.clone()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ops.covariance_update_ref(ref, x, w)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    norm = exact.norm()
    return ((out.double() - exact).norm() / norm).item(), ((ref.double() - exact).norm() / norm).item()


def _check(acc0, x, w, out):
    err, err_ref = _errors(acc0, x, w, out)
    assert err <= 2 * err_ref + 1e-7, (err, err_ref)
    assert torch.equal(out, out.T), "accumulator must stay exactly symmetric"


# ------------------------------------------------------------------ interpreter / any device
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,T", [(1, 5), (17, 50), (33, 77), (100, 130)])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_float64(dtype, d, T, weighted):
    dev = "cuda" if ON_GPU else "cpu"
    acc0, x, w = _inputs(T, d, dtype, weighted, dev)
    out = acc0.clone()
    kernels.covariance_update(out, x, w, config=None if ON_GPU else SMALL)
    _check(acc0, x, w, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_over_T_with_atomics(dtype):
    dev = "cuda" if ON_GPU else "cpu"
    acc0, x, w = _inputs(200, 70, dtype, True, dev, seed=1)
    out = acc0.clone()
    kernels.covariance_update(out, x, w, config=SPLIT if not ON_GPU else Config(32, 32, 32, 4, 2, splits=3),
                              deterministic=False)
    err, err_ref = _errors(acc0, x, w, out)
    assert err <= 2 * err_ref + 1e-7
    torch.testing.assert_close(out, out.T, rtol=0, atol=1e-5)  # atomics: symmetric up to order


@pytest.mark.parametrize("fp32_path", ["tf32x3", "ieee"])
def test_fp32_paths(fp32_path, monkeypatch):
    """fp32 x: tf32x3 for long T, exact fp32 products for short T (forced here both ways)."""
    monkeypatch.setenv("CURVFAST_TRITON_FP32", fp32_path)
    dev = "cuda" if ON_GPU else "cpu"
    acc0, x, w = _inputs(2500 if ON_GPU else 90, 48, torch.float32, True, dev, seed=6)
    out = acc0.clone()
    kernels.covariance_update(out, x, w, config=None if ON_GPU else Config(32, 32, 32, 1, 1))
    _check(acc0, x, w, out)


def test_aligned_path_and_noncontiguous_rows():
    """d multiple of 16 takes the vectorization hints; a row-strided view of a wider matrix must not."""
    dev = "cuda" if ON_GPU else "cpu"
    acc0, x, _ = _inputs(96, 32, torch.bfloat16, False, dev, seed=2)
    out = acc0.clone()
    kernels.covariance_update(out, x, config=None if ON_GPU else Config(32, 32, 32, 1, 1))
    _check(acc0, x, None, out)
    wide = torch.randn(96, 40, device=dev).to(torch.bfloat16)
    view = wide[:, 3:35]  # row stride 40, offset 3: unaligned
    out = acc0.clone()
    kernels.covariance_update(out, view, config=None if ON_GPU else Config(32, 32, 32, 1, 1))
    _check(acc0, view, None, out)
    colmajor = x.t().contiguous().t()  # column stride != 1: copied to rows
    out = acc0.clone()
    kernels.covariance_update(out, colmajor, config=None if ON_GPU else Config(32, 32, 32, 1, 1))
    _check(acc0, colmajor, None, out)


def test_grouped_mixed_sizes_dtypes_weights():
    dev = "cuda" if ON_GPU else "cpu"
    specs = [(40, 17, torch.bfloat16, False), (70, 33, torch.bfloat16, False), (33, 48, torch.float32, True),
             (65, 5, torch.float16, True), (0, 9, torch.bfloat16, False)]
    accs0, xs, ws = [], [], []
    for i, (T, d, dt, wt) in enumerate(specs):
        a, x, w = _inputs(T, d, dt, wt, dev, seed=10 + i)
        accs0.append(a), xs.append(x), ws.append(w)
    outs = [a.clone() for a in accs0]
    kernels.covariance_update_grouped(outs, xs, ws, config=None if ON_GPU else SMALL)
    for a0, x, w, out in zip(accs0, xs, ws, outs):
        _check(a0, x, w, out)
    assert torch.equal(outs[-1], accs0[-1])  # T = 0 leaves the accumulator alone


def test_deterministic_mode_is_bitwise_repeatable(monkeypatch):
    dev = "cuda" if ON_GPU else "cpu"
    acc0, x, w = _inputs(150, 40, torch.bfloat16, True, dev, seed=3)
    cfg = None if ON_GPU else SPLIT
    runs = []
    for _ in range(2):
        out = acc0.clone()
        kernels.covariance_update(out, x, w, deterministic=True, config=cfg)
        runs.append(out)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[0].T)
    monkeypatch.setenv("CURVFAST_DETERMINISTIC", "1")
    out = acc0.clone()
    kernels.covariance_update(out, x, w, config=cfg)  # env forces no split even with splits=3
    assert torch.equal(out, runs[0])


def test_through_ops_dispatch():
    dev = "cuda" if ON_GPU else "cpu"
    acc0, x, w = _inputs(64, 24, torch.bfloat16, True, dev, seed=4)
    out = acc0.clone()
    assert ops.covariance_update(out, x, w, backend="triton") == "triton"
    _check(acc0, x, w, out)
    outs = [acc0.clone(), acc0.clone()]
    ops.covariance_update_grouped(outs, [x, x[:7]], [w, None], backend="triton")
    _check(acc0, x, w, outs[0])
    _check(acc0, x[:7], None, outs[1])


def test_bad_arguments_raise():
    acc = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32"):
        kernels.covariance_update(acc, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(T, 5\)"):
        kernels.covariance_update(torch.zeros(5, 5), torch.zeros(3, 4))


@pytest.mark.parametrize("d,bm,bn", [(1, 16, 16), (17, 32, 16), (100, 16, 32), (100, 64, 64), (257, 128, 256)])
def test_tile_table_covers_lower_triangle_once(d, bm, bn):
    seen = torch.zeros(d, d, dtype=torch.int32)
    for i, j in _tiles_of(d, bm, bn):
        r = torch.arange(i * bm, min(d, (i + 1) * bm))
        c = torch.arange(j * bn, min(d, (j + 1) * bn))
        block = (r[:, None] >= c[None, :]).int()
        assert block.any(), "a tile with no lower element was launched"
        seen[r[0]:r[-1] + 1, c[0]:c[-1] + 1] += block
    assert torch.equal(seen, torch.ones(d, d, dtype=torch.int32).tril())


# ------------------------------------------------------------------ GPU only
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device and TRITON_INTERPRET=0")


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,T", [(256, 4099), (1000, 333), (1024, 2048)])
@pytest.mark.parametrize("weighted", [False, True])
def test_gpu_backends_match_float64(backend, dtype, d, T, weighted):
    if not ops.backend_status()[backend][0]:
        pytest.skip(ops.backend_status()[backend][1])
    acc0, x, w = _inputs(T, d, dtype, weighted, "cuda", seed=d + T)
    out = acc0.clone()
    ops.covariance_update(out, x, w, backend=backend)
    _check(acc0, x, w, out)


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_grouped_backends(backend):
    if not ops.backend_status()[backend][0]:
        pytest.skip(ops.backend_status()[backend][1])
    specs = [(512, 128, torch.bfloat16, False), (300, 200, torch.bfloat16, False), (256, 64, torch.float16, True),
             (128, 96, torch.float32, False), (1, 32, torch.bfloat16, False)]
    accs0, xs, ws = [], [], []
    for i, (T, d, dt, wt) in enumerate(specs):
        a, x, w = _inputs(T, d, dt, wt, "cuda", seed=20 + i)
        accs0.append(a), xs.append(x), ws.append(w)
    outs = [a.clone() for a in accs0]
    ops.covariance_update_grouped(outs, xs, ws, backend=backend)
    for a0, x, w, out in zip(accs0, xs, ws, outs):
        _check(a0, x, w, out)


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_deterministic_bitwise(backend, monkeypatch):
    if not ops.backend_status()[backend][0]:
        pytest.skip(ops.backend_status()[backend][1])
    monkeypatch.setenv("CURVFAST_DETERMINISTIC", "1")
    acc0, x, _ = _inputs(8192, 192, torch.bfloat16, False, "cuda", seed=5)  # few tiles: split would pay
    runs = []
    for _ in range(2):
        out = acc0.clone()
        ops.covariance_update(out, x, backend=backend)
        runs.append(out)
    assert torch.equal(runs[0], runs[1])
