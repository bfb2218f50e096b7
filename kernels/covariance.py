"""Triton kernel for the symmetric K-FAC covariance update ``acc += xᵀ diag(w) x``.

Design
------
* Only tiles that touch the lower triangle are computed. A launch walks a host-built tile
  table of ``(group, row block, column block, split)`` rows (cached per shape), so one launch
  serves several accumulators of different sizes (the grouped form) and, optionally, several
  slices of the token axis T (split-T).
* Each program computes ``C = X[:, rows]ᵀ diag(w) X[:, cols]`` over its T-slice with fp32
  accumulation and writes it straight into the accumulator: ``C[r, c]`` for ``r >= c`` into
  ``acc[r, c]`` and, for ``r > c``, the same value into ``acc[c, r]``. Every element is
  written by exactly one program (per split), so the update is exactly symmetric.
* Split-T (``splits > 1``) adds partial tiles with fp32 atomics: faster when there are few
  tiles, not bitwise repeatable. Deterministic mode (``CURVFAST_DETERMINISTIC=1``,
  ``torch.use_deterministic_algorithms(True)`` or ``deterministic=True``) never splits and
  does a plain load-add-store.

Precision (error vs float64 must stay within ~2x of an fp32 GEMM on the upcast data)
----------------------------------------------------------------------------------------
* bf16/fp16 ``x`` without weights: the 16-bit values go to the tensor cores as they are;
  their products are exact in fp32 and accumulate in fp32.
* fp32 ``x``: plain ``tl.dot`` would use TF32 (10-bit mantissa), far too coarse for
  eigenvectors. We use ``input_precision="tf32x3"`` (hi/lo split of both operands, three
  TF32 products), which keeps ~21 bits per product; the error is then dominated by the fp32
  accumulation, but only for long sums: below T = 2048 (cheap anyway) the kernel uses
  ``input_precision="ieee"`` (exact fp32 products, CUDA cores). ``CURVFAST_TRITON_FP32=
  ieee|tf32x3`` overrides.
* Weighted bf16: rounding ``x·w`` to bf16 would cost 8 bits per product, and the weight
  cannot be applied after the dot (it varies along the reduced axis). We form
  ``v = x·w`` in fp32 and split it exactly into three bf16 parts ``v = hi + mid + lo``
  (24 significant bits in all); ``x`` itself is exact in bf16, so three bf16 dots give
  ``vᵀx`` with ~fp32 accuracy at tensor-core speed (1/3 of the unweighted rate).
* Weighted fp16: a three-way fp16 split would underflow (fp16's exponent range), so ``v``
  is split into three TF32-exact parts instead (fp16 ``x`` is exact in TF32): three TF32
  dots.
* Under the interpreter (``TRITON_INTERPRET=1``, CPU) 16-bit dots are broken, so every
  operand is widened to fp32 first (constexpr ``INTERPRET``); the split arithmetic still runs.
"""
from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

# MODE values (constexpr): how the dot is formed.
_NATIVE16 = 0  # bf16/fp16 unweighted: one 16-bit tensor-core dot
_FP32_3XTF32 = 1  # fp32 x (weighted or not): tf32x3
_BF16_SPLIT3 = 2  # bf16 weighted: v = x*w split into three bf16 parts
_FP16_TF32X3 = 3  # fp16 weighted: v split into three TF32-exact parts
_FP32_IEEE = 4  # fp32 x with short T: exact fp32 FMA products
_FP32_TF32X3_MIN_T = 2048  # below this, tf32x3's per-product error (~2^-21) is not hidden

_GROUP_FIELDS = 8  # x_ptr, acc_ptr, w_ptr, T, d, stride_t, stride_d, t_chunk
_GROUP_BAND = 8  # row blocks per band in the tile order (L2 reuse of column panels)


@triton.jit
def _cov_step(c, a_ptrs, b_ptrs, w_ptrs, k, t_end, offs_k, MODE: tl.constexpr, HAS_W: tl.constexpr,
              INTERPRET: tl.constexpr):
    """c += x[k:k+BK, rows]ᵀ diag(w) x[k:k+BK, cols] for one K step (see the module notes)."""
    k_ok = (k + offs_k) < t_end
    a = tl.load(a_ptrs, mask=k_ok[:, None], other=0.0)
    b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
    if MODE == 0:
        if INTERPRET:
            c += tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), input_precision="ieee")
        else:
            c += tl.dot(tl.trans(a), b)
    else:
        v = a.to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptrs, mask=k_ok, other=0.0)
            v = v * w[:, None]
        if MODE == 1:
            if INTERPRET:
                c += tl.dot(tl.trans(v), b, input_precision="ieee")
            else:
                c += tl.dot(tl.trans(v), b, input_precision="tf32x3")
        elif MODE == 4:
            c += tl.dot(tl.trans(v), b, input_precision="ieee")
        elif MODE == 2:
            # v = hi + mid + lo exactly (each part is a bf16 value); x is exact in bf16.
            hi = v.to(tl.bfloat16)
            r = v - hi.to(tl.float32)
            mid = r.to(tl.bfloat16)
            lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
            if INTERPRET:
                bf = b.to(tl.float32)
                c += tl.dot(tl.trans(hi.to(tl.float32)), bf, input_precision="ieee")
                c += tl.dot(tl.trans(mid.to(tl.float32)), bf, input_precision="ieee")
                c += tl.dot(tl.trans(lo.to(tl.float32)), bf, input_precision="ieee")
            else:
                c += tl.dot(tl.trans(hi), b)
                c += tl.dot(tl.trans(mid), b)
                c += tl.dot(tl.trans(lo), b)
        else:
            # v = hi + mid + lo with hi and mid TF32-exact (11 significant bits each); lo
            # loses ~2^-11 of itself in the TF32 dot, ~2^-33 of v. fp16 x is TF32-exact.
            hi = (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            r = v - hi
            mid = (r.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            lo = r - mid
            bf = b.to(tl.float32)
            if INTERPRET:
                c += tl.dot(tl.trans(hi), bf, input_precision="ieee")
                c += tl.dot(tl.trans(mid), bf, input_precision="ieee")
                c += tl.dot(tl.trans(lo), bf, input_precision="ieee")
            else:
                c += tl.dot(tl.trans(hi), bf, input_precision="tf32")
                c += tl.dot(tl.trans(mid), bf, input_precision="tf32")
                c += tl.dot(tl.trans(lo), bf, input_precision="tf32")
    return c


@triton.jit
def _cov_tiles_kernel(
    groups_ptr,  # int64 [n_groups, 8]
    tiles_ptr,  # int32 [n_tiles, 4]: group, row block, column block, split index
    X_DTYPE: tl.constexpr,
    MODE: tl.constexpr,
    HAS_W: tl.constexpr,
    ATOMIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.load(tiles_ptr + pid * 4)
    bm = tl.load(tiles_ptr + pid * 4 + 1)
    bn = tl.load(tiles_ptr + pid * 4 + 2)
    sp = tl.load(tiles_ptr + pid * 4 + 3)

    gp = groups_ptr + g * 8
    x_ptr = tl.load(gp).to(tl.pointer_type(X_DTYPE))
    acc_ptr = tl.load(gp + 1).to(tl.pointer_type(tl.float32))
    T = tl.load(gp + 3)
    d = tl.load(gp + 4)
    st = tl.load(gp + 5)
    sd = tl.load(gp + 6)
    chunk = tl.load(gp + 7)
    if ALIGNED:
        # The host checked: 16-byte aligned bases, unit column stride, row stride and d
        # multiples of 16. Values read from a table carry no divisibility facts otherwise,
        # and without them the loads would not be vectorized.
        x_ptr = tl.multiple_of(x_ptr, 16)
        acc_ptr = tl.multiple_of(acc_ptr, 16)
        st = tl.multiple_of(st, 16)
        d = tl.multiple_of(d, 16)
        sd = 1

    rows = bm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = bn * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range columns wrap around instead of being masked (keeps the loads unmasked
    # along d); their products land only in outputs that the epilogue masks off.
    rows_ld = rows % d
    cols_ld = cols % d
    if ALIGNED:
        rows_ld = tl.max_contiguous(tl.multiple_of(rows_ld, 16), 16)
        cols_ld = tl.max_contiguous(tl.multiple_of(cols_ld, 16), 16)

    t_begin = sp.to(tl.int64) * chunk
    t_end = tl.minimum(t_begin + chunk, T)
    offs_k = tl.arange(0, BLOCK_K)
    t_offs = (t_begin + offs_k).to(tl.int64)
    a_ptrs = x_ptr + t_offs[:, None] * st + rows_ld[None, :].to(tl.int64) * sd  # (BK, BM)
    b_ptrs = x_ptr + t_offs[:, None] * st + cols_ld[None, :].to(tl.int64) * sd  # (BK, BN)
    if HAS_W:
        w_ptrs = tl.load(gp + 2).to(tl.pointer_type(tl.float32)) + t_begin + offs_k

    c = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    step = BLOCK_K * st
    if not HAS_W:
        w_ptrs = a_ptrs  # unused placeholder
    if INTERPRET:
        # The interpreter keeps scalars as 1-element arrays, which range() rejects.
        k = t_begin
        while k < t_end:
            c = _cov_step(c, a_ptrs, b_ptrs, w_ptrs, k, t_end, offs_k, MODE, HAS_W, INTERPRET)
            a_ptrs += step
            b_ptrs += step
            if HAS_W:
                w_ptrs += BLOCK_K
            k += BLOCK_K
    else:
        for k in range(t_begin, t_end, BLOCK_K):
            c = _cov_step(c, a_ptrs, b_ptrs, w_ptrs, k, t_end, offs_k, MODE, HAS_W, INTERPRET)
            a_ptrs += step
            b_ptrs += step
            if HAS_W:
                w_ptrs += BLOCK_K

    # Epilogue: lower part in place, strictly-lower part mirrored into the upper triangle.
    in_d = (rows[:, None] < d) & (cols[None, :] < d)
    low = in_d & (rows[:, None] >= cols[None, :])
    p_low = acc_ptr + rows[:, None].to(tl.int64) * d + cols[None, :]
    ct = tl.trans(c)  # (BN, BM): element [c, r]
    up = (cols[:, None] < d) & (rows[None, :] < d) & (rows[None, :] > cols[:, None])
    p_up = acc_ptr + cols[:, None].to(tl.int64) * d + rows[None, :]
    if ATOMIC:
        tl.atomic_add(p_low, c, mask=low, sem="relaxed")
        tl.atomic_add(p_up, ct, mask=up, sem="relaxed")
    else:
        old = tl.load(p_low, mask=low, other=0.0)
        tl.store(p_low, old + c, mask=low)
        old_t = tl.load(p_up, mask=up, other=0.0)
        tl.store(p_up, old_t + ct, mask=up)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------
class Config(NamedTuple):
    """One launch configuration: tile shape, warps, pipeline stages, T splits."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    splits: int = 1


# Hopper candidates per mode (the autotuner times these; the first is the untuned default).
_HOPPER_CONFIGS = {
    _NATIVE16: [
        Config(128, 256, 64, 8, 3),
        Config(256, 128, 64, 8, 3),
        Config(128, 128, 64, 8, 4),
        Config(128, 128, 64, 4, 4),
        Config(128, 128, 128, 8, 3),
    ],
    _FP32_3XTF32: [
        Config(128, 128, 32, 8, 3),
        Config(128, 128, 32, 4, 3),
        Config(128, 64, 32, 4, 4),
        Config(64, 128, 32, 4, 4),
    ],
    _BF16_SPLIT3: [
        Config(128, 128, 64, 8, 3),
        Config(128, 256, 64, 8, 3),
        Config(64, 128, 64, 4, 4),
    ],
    _FP16_TF32X3: [
        Config(128, 128, 32, 8, 3),
        Config(64, 128, 32, 4, 4),
        Config(128, 64, 32, 4, 4),
    ],
    _FP32_IEEE: [
        Config(128, 128, 32, 8, 2),
        Config(64, 128, 32, 4, 3),
        Config(64, 64, 32, 4, 3),
    ],
}
# Interpreter: cost is per program instance, so few large tiles.
_INTERPRET_CONFIG = Config(64, 64, 64, 1, 1)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _deterministic(flag: Optional[bool]) -> bool:
    if flag is not None:
        return bool(flag)
    return os.environ.get("CURVFAST_DETERMINISTIC", "0") == "1" or torch.are_deterministic_algorithms_enabled()


def _mode(dtype: torch.dtype, has_w: bool, t_min: int = 1 << 30) -> int:
    if dtype == torch.float32:
        # tf32x3 keeps ~21 bits per product: hidden under fp32 accumulation error only for
        # long sums. CURVFAST_TRITON_FP32=ieee|tf32x3 overrides.
        choice = os.environ.get("CURVFAST_TRITON_FP32", "auto")
        if choice == "ieee" or (choice == "auto" and t_min < _FP32_TF32X3_MIN_T):
            return _FP32_IEEE
        return _FP32_3XTF32
    if not has_w:
        return _NATIVE16
    return _BF16_SPLIT3 if dtype == torch.bfloat16 else _FP16_TF32X3


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _splits_for(T: int, block_k: int, splits: int) -> tuple[int, int]:
    """(splits actually used, T-chunk length, a multiple of block_k) for one group."""
    splits = max(1, min(splits, triton.cdiv(T, block_k)))
    chunk = triton.cdiv(triton.cdiv(T, splits), block_k) * block_k
    return triton.cdiv(T, chunk), chunk


def _tiles_of(d: int, bm: int, bn: int) -> list[tuple[int, int]]:
    """Tiles touching the lower triangle, in bands of row blocks walked column-first."""
    n_m, n_n = triton.cdiv(d, bm), triton.cdiv(d, bn)
    out = []
    for band in range(0, n_m, _GROUP_BAND):
        for j in range(n_n):
            for i in range(band, min(band + _GROUP_BAND, n_m)):
                # Tile (i, j) holds some r >= c iff its largest row reaches its first column.
                if min(d - 1, (i + 1) * bm - 1) >= j * bn:
                    out.append((i, j))
    return out


@functools.lru_cache(maxsize=256)
def _tile_table_host(key: tuple, bm: int, bn: int) -> tuple[list[int], int]:
    """Flat int32 rows for groups described by ``key = ((d, splits, work), ...)``.

    Groups with more work per tile go first (longest jobs first balances the tail); the
    split index is the outer loop inside a group so concurrent programs share a T-slice.
    """
    order = sorted(range(len(key)), key=lambda g: -key[g][2])
    flat: list[int] = []
    for g in order:
        d, splits, _ = key[g]
        tiles = _tiles_of(d, bm, bn)
        for s in range(splits):
            for i, j in tiles:
                flat += (g, i, j, s)
    return flat, len(flat) // 4


_DEVICE_TABLES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def _device_cached(key: tuple, make, device: torch.device) -> torch.Tensor:
    k = key + (str(device),)
    t = _DEVICE_TABLES.get(k)
    if t is None:
        t = make().to(device)
        _DEVICE_TABLES[k] = t
        if len(_DEVICE_TABLES) > 128:
            _DEVICE_TABLES.popitem(last=False)
    else:
        _DEVICE_TABLES.move_to_end(k)
    return t


def _aligned(acc: torch.Tensor, x: torch.Tensor) -> bool:
    d = acc.shape[0]
    return (
        d % 16 == 0
        and x.stride(1) == 1
        and x.stride(0) % 16 == 0
        and x.data_ptr() % 16 == 0
        and acc.data_ptr() % 16 == 0
    )


def _launch(accs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], ws: Sequence[Optional[torch.Tensor]],
            cfg: Config, deterministic: bool) -> None:
    """One launch for groups that share x dtype and weightedness."""
    device = xs[0].device
    has_w = ws[0] is not None
    mode = _mode(xs[0].dtype, has_w, min(x.shape[0] for x in xs))
    splits = 1 if deterministic else cfg.splits
    rows, key = [], []
    for acc, x, w in zip(accs, xs, ws):
        T, d = x.shape
        s, chunk = _splits_for(T, cfg.block_k, splits)
        key.append((d, s, min(T, chunk)))
        rows += [x.data_ptr(), acc.data_ptr(), 0 if w is None else w.data_ptr(), T, d, x.stride(0),
                 x.stride(1), chunk]
    key = tuple(key)
    atomic = any(k[1] > 1 for k in key)
    aligned = all(_aligned(a, x) for a, x in zip(accs, xs))
    flat, n_tiles = _tile_table_host(key, cfg.block_m, cfg.block_n)
    tiles = _device_cached(("tiles", key, cfg.block_m, cfg.block_n),
                           lambda: torch.tensor(flat, dtype=torch.int32), device)
    groups = _device_cached(("groups", tuple(rows)), lambda: torch.tensor(rows, dtype=torch.int64), device)
    kwargs = {} if _interpreted() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    _cov_tiles_kernel[(n_tiles,)](
        groups, tiles,
        X_DTYPE=_TL_DTYPE[xs[0].dtype], MODE=mode, HAS_W=has_w, ATOMIC=atomic, ALIGNED=aligned,
        INTERPRET=_interpreted(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        **kwargs,
    )


# --------------------------------------------------------------------------------------
# Autotuning (our own: the tile table depends on the tile shape, and split-T atomics must
# run on scratch accumulators)
# --------------------------------------------------------------------------------------
_TUNED: dict[tuple, Config] = {}


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _tune_key(xs, ws, deterministic: bool) -> tuple:
    return (xs[0].dtype, ws[0] is not None, deterministic, xs[0].device.index,
            _mode(xs[0].dtype, ws[0] is not None, min(x.shape[0] for x in xs)),
            tuple(sorted((_pow2(x.shape[1]), _pow2(x.shape[0])) for x in xs)))


def _n_sm(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _candidates(xs, ws, deterministic: bool) -> list[Config]:
    mode = _mode(xs[0].dtype, ws[0] is not None, min(x.shape[0] for x in xs))
    out = []
    for cfg in _HOPPER_CONFIGS[mode]:
        out.append(cfg)
        if deterministic:
            continue
        n_tiles = sum(len(_tiles_of(x.shape[1], cfg.block_m, cfg.block_n)) for x in xs)
        want = 2 * _n_sm(xs[0].device)
        if n_tiles < want:
            max_split = max(1, min(x.shape[0] for x in xs) // (cfg.block_k * 8))
            s = min(_pow2(triton.cdiv(want, n_tiles)), _pow2(max_split))
            if s > 1:
                out.append(cfg._replace(splits=s))
    return out


def _autotune(accs, xs, ws, deterministic: bool) -> Config:
    key = _tune_key(xs, ws, deterministic)
    if key in _TUNED:
        return _TUNED[key]
    cands = _candidates(xs, ws, deterministic)
    if os.environ.get("CURVFAST_TRITON_AUTOTUNE", "1") == "0" or len(cands) == 1:
        _TUNED[key] = cands[0]
        return cands[0]
    from triton.testing import do_bench

    scratch = [torch.zeros_like(a) for a in accs]
    best, best_ms = None, math.inf
    for cfg in cands:
        try:
            ms = do_bench(lambda: _launch(scratch, xs, ws, cfg, deterministic), warmup=10, rep=40)
        except Exception:  # a config that does not compile/fit on this device is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    del scratch
    if best is None:
        raise RuntimeError(f"curvfast.kernels.covariance: no Triton config ran for x of {xs[0].dtype}, "
                           f"shapes {[tuple(x.shape) for x in xs]}")
    _TUNED[key] = best
    return best


def tuned_config(xs: Sequence[torch.Tensor], weights=None, deterministic: Optional[bool] = None) -> Optional[Config]:
    """The config the autotuner picked for such inputs (None if not tuned yet)."""
    ws = [None] * len(xs) if weights is None else list(weights)
    return _TUNED.get(_tune_key(list(xs), ws, _deterministic(deterministic)))


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def _prepare(acc: torch.Tensor, x: torch.Tensor, w: Optional[torch.Tensor]):
    if acc.dtype != torch.float32 or acc.dim() != 2 or acc.shape[0] != acc.shape[1] or not acc.is_contiguous():
        raise ValueError(f"curvfast.kernels.covariance: accumulator must be a contiguous (d, d) float32 "
                         f"tensor, got {tuple(acc.shape)} {acc.dtype}")
    if x.dim() != 2 or x.shape[1] != acc.shape[0] or x.dtype not in _TL_DTYPE:
        raise ValueError(f"curvfast.kernels.covariance: x must be (T, {acc.shape[0]}) fp32/bf16/fp16, "
                         f"got {tuple(x.shape)} {x.dtype}")
    if x.device != acc.device:
        raise ValueError(f"curvfast.kernels.covariance: x is on {x.device}, accumulator on {acc.device}")
    if w is not None:
        if w.shape != (x.shape[0],):
            raise ValueError(f"curvfast.kernels.covariance: weight must be ({x.shape[0]},), got {tuple(w.shape)}")
        w = w.to(device=x.device, dtype=torch.float32).contiguous()
    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous()  # the kernel reads rows of x; a column-major x would crawl
    return acc, x, w


def covariance_update_grouped(accs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
                              weights: Optional[Sequence[Optional[torch.Tensor]]] = None, *,
                              deterministic: Optional[bool] = None, config: Optional[Config] = None) -> None:
    """``accs[i] += xs[i]ᵀ diag(weights[i]) xs[i]`` for every i, one launch per (dtype, weighted) class.

    accs[i]: (d_i, d_i) float32 contiguous, full symmetric afterwards. xs[i]: (T_i, d_i)
    fp32/bf16/fp16. weights[i]: optional (T_i,). ``config`` forces a launch config (tests).
    """
    if len(accs) != len(xs):
        raise ValueError(f"curvfast.kernels.covariance: {len(accs)} accumulators but {len(xs)} inputs")
    weights = [None] * len(xs) if weights is None else list(weights)
    if len(weights) != len(xs):
        raise ValueError(f"curvfast.kernels.covariance: {len(weights)} weights for {len(xs)} inputs")
    det = _deterministic(deterministic)
    classes: dict[tuple, list] = {}
    for acc, x, w in zip(accs, xs, weights):
        acc, x, w = _prepare(acc, x, w)
        if x.shape[0] == 0 or x.shape[1] == 0:
            continue
        classes.setdefault((x.dtype, w is not None), []).append((acc, x, w))
    for members in classes.values():
        a, x, w = (list(t) for t in zip(*members))
        if config is not None:
            cfg = config
        elif _interpreted() or x[0].device.type != "cuda":
            cfg = _INTERPRET_CONFIG
        else:
            cfg = _autotune(a, x, w, det)
        _launch(a, x, w, cfg, det)


def covariance_update(acc: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                      deterministic: Optional[bool] = None, config: Optional[Config] = None) -> None:
    """``acc += xᵀ diag(weight) x``; acc: (d, d) float32 contiguous (full symmetric after),
    x: (T, d) fp32/bf16/fp16, weight: optional (T,)."""
    covariance_update_grouped([acc], [x], [weight], deterministic=deterministic, config=config)
