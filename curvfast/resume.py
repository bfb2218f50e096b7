"""Checkpoints of a running factor collection, so a killed job resumes where it stopped.

A checkpoint holds the raw (undivided) fp32 accumulators, the number of counted samples, the
number of batches consumed from the data iterator and the job's identity (sampled targets
are seeded per batch, so no RNG state is needed). It is written atomically (temporary file + rename), so a SIGKILL at any moment
leaves either the previous checkpoint or the new one, never a torn file. Resuming replays the
data iterator past the consumed batches: the result equals an uninterrupted run (the same
additions in the same order).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from curvfast.store import _atomic_save

PathLike = Union[str, os.PathLike]


class ResumeError(ValueError):
    """A checkpoint exists but belongs to a different job."""


@dataclass
class CollectionState:
    job: dict[str, Any]
    a_acc: dict[str, torch.Tensor]
    g_acc: dict[str, torch.Tensor]
    a_owner: dict[str, str]
    tokens: int
    batches: int


def save_state(path: PathLike, state: CollectionState) -> None:
    tensors = {f"A/{k}": v for k, v in state.a_acc.items()}
    tensors.update({f"G/{k}": v for k, v in state.g_acc.items()})
    meta = {
        "curvfast.format": "collection-checkpoint",
        "job": json.dumps(state.job, sort_keys=True, default=str),
        "a_owner": json.dumps(state.a_owner),
        "tokens": str(state.tokens),
        "batches": str(state.batches),
    }
    _atomic_save(tensors, meta, path)


def load_state(path: PathLike, job: dict[str, Any], device: torch.device) -> Optional[CollectionState]:
    """The saved state of ``job`` at ``path``, or None if there is no checkpoint yet."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("curvfast.format") != "collection-checkpoint":
                raise ResumeError(f"{path}: not a curvfast collection checkpoint")
            saved_job = json.loads(md["job"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ResumeError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own errors
        raise ResumeError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); delete it to start over") from None
    expected = json.loads(json.dumps(job, sort_keys=True, default=str))
    if saved_job != expected:
        diff = sorted(k for k in set(saved_job) | set(expected) if saved_job.get(k) != expected.get(k))
        raise ResumeError(f"{path}: checkpoint of a different job (differs in {', '.join(diff)}); "
                          "delete it or use the same settings to resume")
    return CollectionState(
        job=saved_job,
        a_acc={k[2:]: v.to(device) for k, v in tensors.items() if k.startswith("A/")},
        g_acc={k[2:]: v.to(device) for k, v in tensors.items() if k.startswith("G/")},
        a_owner=json.loads(md["a_owner"]),
        tokens=int(md["tokens"]),
        batches=int(md["batches"]),
    )
