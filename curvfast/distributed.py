"""Multi-process factor collection and eigendecomposition with torch.distributed (torchrun).

Each rank reads its own shard of the data (batch i goes to rank i % world) and accumulates
locally; no communication happens per batch. At the end one reduction per factor delivers
the summed factor to its owner rank. Owners are chosen by balancing eigendecomposition cost
(n³), keeping every module together with the A it shares with its siblings, so each owner can
decompose and write its factors and eigenbases alone. Rank 0 writes an index of the parts.

Sampled targets are seeded by (seed, global batch index), so the result equals a
single-process run over the same batches, up to reduction-order rounding.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from curvfast.collect import FactorSet, _prepare, accumulate, finalize
from curvfast.modules import LayerSpec, ModuleSpec, dims

PathLike = Union[str, os.PathLike]


def assign_owners(groups: dict[str, list[tuple[str, int, int]]], world: int) -> dict[str, int]:
    """Greedy longest-processing-time assignment of A groups to ranks by eigendecomposition
    cost. groups: a_key → [(module, d_out, d_in)]. Returns a_key → rank."""
    cost = {key: mods[0][2] ** 3 + sum(d_out**3 for _, d_out, _ in mods) for key, mods in groups.items()}
    load = [0] * world
    owner = {}
    for key in sorted(cost, key=lambda k: (-cost[k], k)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[key] = r
        load[r] += cost[key]
    return owner


def collect_factors_distributed(
    model: nn.Module,
    batches: Iterable[Any],
    modules: ModuleSpec = "mlp",
    layers: LayerSpec = None,
    fisher: str = "true",
    seed: Optional[int] = 0,
    progress: bool = True,
    max_tokens: Optional[int] = None,
    backend: str = "auto",
    checkpoint: Optional[PathLike] = None,
    checkpoint_every: int = 1_000_000,
    group: Optional[dist.ProcessGroup] = None,
) -> FactorSet:
    """Collect factors across the ranks of ``group`` (default: the world).

    Every rank passes the same ``batches`` iterable (each keeps batches i % world == rank) and
    the same settings. Returns, on each rank, the FactorSet of the modules it owns (possibly
    empty); ``meta["owners"]`` maps every module to its rank. ``max_tokens`` and
    ``checkpoint`` are per rank (give each rank its own checkpoint file).
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: launch with torchrun and call "
                           "torch.distributed.init_process_group first")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if seed is None:
        raise ValueError("distributed collection needs an explicit seed shared by all ranks")
    names, seed = _prepare(model, modules, layers, fisher, seed)
    started = time.time()
    col, tokens = accumulate(model, batches, names, fisher, seed, progress=progress and rank == 0,
                             max_tokens=max_tokens, backend=backend, checkpoint=checkpoint,
                             checkpoint_every=checkpoint_every, shard=(rank, world))
    device = next(model.parameters()).device
    comm_device = device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    total = torch.tensor([tokens], dtype=torch.int64, device=comm_device)
    dist.all_reduce(total, group=group)
    total_tokens = int(total.item())
    if total_tokens == 0:
        raise ValueError("no counted positions in the data on any rank")
    # Which modules share an A is seen in the first batch; a rank without data learns it from others.
    owners_seen: list[Any] = [None] * world
    dist.all_gather_object(owners_seen, col.a_owner if col.a_owner else None, group=group)
    a_owner = next(o for o in owners_seen if o)
    groups: dict[str, list[tuple[str, int, int]]] = {}
    for n in names:
        d_out, d_in = dims(model.get_submodule(n))
        groups.setdefault(a_owner[n], []).append((n, d_out, d_in))
    owner = assign_owners(groups, world)
    a_sum, g_sum = {}, {}
    for key in sorted(groups):  # the same order on every rank
        d_in = groups[key][0][2]
        buf = col.a_acc.get(key)
        buf = torch.zeros(d_in, d_in, dtype=torch.float32, device=comm_device) if buf is None else buf.to(comm_device)
        dist.reduce(buf, dst=owner[key], group=group)
        if rank == owner[key]:
            a_sum[key] = buf.to(device)
        for n, d_out, _ in groups[key]:
            buf = col.g_acc.get(n)
            buf = torch.zeros(d_out, d_out, dtype=torch.float32, device=comm_device) if buf is None else buf.to(comm_device)
            dist.reduce(buf, dst=owner[key], group=group)
            if rank == owner[key]:
                g_sum[n] = buf.to(device)
    mine = [n for n in names if owner[a_owner[n]] == rank]
    fs = finalize(model, mine, a_sum, g_sum, a_owner, total_tokens, fisher, seed, time.time() - started)
    fs.meta.update({"world_size": world, "rank": rank, "owners": {n: owner[a_owner[n]] for n in names}})
    return fs


def save_distributed(obj, directory: PathLike, kind: str = "factors", group: Optional[dist.ProcessGroup] = None) -> Path:
    """Each rank writes its part ``{kind}-rank{r}.safetensors``; rank 0 writes ``{kind}.index.json``
    mapping every module to its part file. Returns the index path."""
    from curvfast.store import save_eigen, save_factors

    rank = dist.get_rank(group)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    part = directory / f"{kind}-rank{rank:05d}.safetensors"
    (save_factors if kind == "factors" else save_eigen)(obj, part)
    dist.barrier(group=group)
    index = directory / f"{kind}.index.json"
    if rank == 0:
        owners = obj.meta["owners"]
        body = {"format": f"curvfast.{kind}.index", "modules": {n: f"{kind}-rank{r:05d}.safetensors" for n, r in owners.items()}}
        tmp = index.with_name(index.name + ".tmp")
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, index)
    dist.barrier(group=group)
    return index


def load_index(index: PathLike, kind: str = "factors", model: Optional[nn.Module] = None):
    """Merge the parts listed in an index written by :func:`save_distributed`."""
    from curvfast.eigen import EigenSet
    from curvfast.store import StoreError, load_eigen, load_factors

    index = Path(index)
    body = json.loads(index.read_text())
    if body.get("format") != f"curvfast.{kind}.index":
        raise StoreError(f"{index}: not a curvfast {kind} index")
    loader = load_factors if kind == "factors" else load_eigen
    merged: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for part in sorted(set(body["modules"].values())):
        got = loader(index.parent / part, model=model)
        merged.update(got.items())
        meta = meta or dict(got.meta)
    missing = set(body["modules"]) - set(merged)
    if missing:
        raise StoreError(f"{index}: parts lack modules {sorted(missing)[:3]}")
    for k in ("rank",):
        meta.pop(k, None)
    return FactorSet(merged, meta) if kind == "factors" else EigenSet(merged, meta)
