"""Memory planning for factor collection on large models.

A 7B model's MLP factors alone are ~51 GB in fp32; they rarely fit next to the model and its
activations. The planner groups the tracked modules (modules sharing an input stay together,
since they share A), decides how many groups fit in one pass under a device budget, and where
the accumulators live. Several passes read the data again (the batches must be re-iterable);
each pass runs forward and backward only as deep as its lowest tracked layer.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn

from curvfast.collect import FactorSet, collect_factors
from curvfast.modules import dims, layer_index

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'60GB', '512MiB', '1.5T' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r} (use e.g. 60GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class Group:
    """Modules that read the same input (one shared A) and their accumulator bytes."""

    a_key: str
    modules: list[str]
    d_in: int
    d_outs: list[int]
    layer: Optional[int]

    @property
    def nbytes(self) -> int:
        return 4 * (self.d_in**2 + sum(d * d for d in self.d_outs))

    @property
    def flops_per_token(self) -> int:
        # Symmetric updates: T·d·(d+1) flops per factor.
        return self.d_in * (self.d_in + 1) + sum(d * (d + 1) for d in self.d_outs)


@dataclass
class Plan:
    passes: list[list[Group]]
    accumulators: str  # "device" or "host"
    budget: Optional[int]
    model_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def factor_bytes(self) -> int:
        return sum(g.nbytes for p in self.passes for g in p)

    def modules(self, i: int) -> list[str]:
        return [m for g in self.passes[i] for m in g.modules]

    def describe(self, tokens: Optional[int] = None, factor_tflops: Optional[float] = None) -> str:
        lines = [f"collection plan: {sum(len(p) for p in self.passes)} input groups, "
                 f"{sum(len(g.modules) for p in self.passes for g in p)} modules, "
                 f"factors {fmt_bytes(self.factor_bytes)} fp32 (files: about half, packed), "
                 f"model {fmt_bytes(self.model_bytes)}, budget {fmt_bytes(self.budget) if self.budget else 'none'}"]
        for i, p in enumerate(self.passes):
            layers = sorted({g.layer for g in p if g.layer is not None})
            span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layer index"
            lines.append(f"  pass {i + 1}: {len(p)} groups ({span}), accumulators {fmt_bytes(sum(g.nbytes for g in p))} "
                         f"on the {self.accumulators}")
        flops = sum(g.flops_per_token for p in self.passes for g in p)
        est = f"factor updates: {flops / 1e9:.2f} GFLOP per token"
        if tokens and factor_tflops:
            est += f"; ~{flops * tokens / (factor_tflops * 1e12) / 60:.1f} min for {tokens:,} tokens at {factor_tflops} TFLOP/s"
        lines.append("  " + est + (f"; the data is read {len(self.passes)} times" if len(self.passes) > 1 else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def input_groups(model: nn.Module, names: list[str]) -> list[Group]:
    """Group modules that read the same input, by structure (siblings in one block with the
    same d_in and role: gate/up, c_fc, q/k/v). Checked against the real sharing at runtime by
    collect_factors, which never double-counts."""
    from curvfast.modules import FAMILIES

    inputs = {p for f in FAMILIES for p in f.inputs}
    groups: dict[tuple, Group] = {}
    for n in names:
        d_out, d_in = dims(model.get_submodule(n))
        parent, _, leaf = n.rpartition(".")
        shared = leaf in inputs or leaf in ("gate_proj", "up_proj")
        key = (parent, d_in) if shared else (n,)
        g = groups.get(key)
        if g is None:
            groups[key] = Group(n, [n], d_in, [d_out], layer_index(model, n))
        else:
            g.modules.append(n)
            g.d_outs.append(d_out)
    return list(groups.values())


def plan_collection(model: nn.Module, names: list[str], budget: Optional[int] = None,
                    activation_bytes: int = 0, host_accumulators: bool = False) -> Plan:
    """Choose passes so that model + activations + one pass's accumulators fit in ``budget``.

    budget: device bytes available (None: everything in one pass). activation_bytes: an
    estimate for one batch's activations and logits. host_accumulators: keep accumulators in
    (pinned) host memory in one pass instead of several device passes.
    """
    groups = input_groups(model, names)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    notes: list[str] = []
    if budget is None:
        return Plan([groups], "device", None, model_bytes)
    free = budget - model_bytes - activation_bytes
    if host_accumulators:
        notes.append(f"accumulators packed in pinned host memory ({fmt_bytes(sum(g.nbytes for g in groups) / 2)}; "
                     "collect_factors(..., accumulator_device='cpu', packed_accumulators=True)): each update "
                     "crosses PCIe; choose this only when extra passes over the data cost more")
        return Plan([groups], "host", budget, model_bytes, notes)
    if free <= 0:
        raise ValueError(f"the model ({fmt_bytes(model_bytes)}) and activations ({fmt_bytes(activation_bytes)}) "
                         f"alone exceed the budget {fmt_bytes(budget)}")
    biggest = max(g.nbytes for g in groups)
    if biggest > free:
        raise ValueError(f"one input group needs {fmt_bytes(biggest)} of accumulators but only {fmt_bytes(free)} "
                         "is left; raise the budget or use host accumulators")
    # Fill passes in layer order, top layers first: an upper pass's backward is shallow.
    order = sorted(groups, key=lambda g: (-(g.layer if g.layer is not None else -1), g.a_key))
    passes: list[list[Group]] = [[]]
    used = 0
    for g in order:
        if used + g.nbytes > free and passes[-1]:
            passes.append([])
            used = 0
        passes[-1].append(g)
        used += g.nbytes
    if len(passes) > 1:
        notes.append(f"{len(passes)} passes over the data: accumulators of all modules "
                     f"({fmt_bytes(sum(g.nbytes for g in groups))}) exceed the {fmt_bytes(free)} left")
    return Plan(passes, "device", budget, model_bytes, notes)


def collect_planned(model: nn.Module, batches: Iterable[Any], plan: Plan, **kwargs: Any) -> FactorSet:
    """Run :func:`collect_factors` once per pass of ``plan`` over re-iterable ``batches`` and
    merge the results (each pass sees the same batches, so token counts agree)."""
    if len(plan.passes) > 1 and iter(batches) is batches:
        raise ValueError("a multi-pass plan needs re-iterable batches (a list or curvfast.data.Batches), "
                         "not a one-shot iterator")
    merged: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    checkpoint = kwargs.pop("checkpoint", None)
    for i in range(len(plan.passes)):
        ck = None if checkpoint is None else f"{checkpoint}.pass{i + 1}"
        if plan.accumulators == "host":
            kwargs.setdefault("accumulator_device", "cpu")
            kwargs.setdefault("packed_accumulators", True)
        fs = collect_factors(model, batches, modules=plan.modules(i), checkpoint=ck, **kwargs)
        if meta and fs.tokens != meta["tokens"]:
            raise RuntimeError(f"pass {i + 1} counted {fs.tokens} tokens but pass 1 counted {meta['tokens']}: "
                               "the batches changed between passes")
        meta = meta or dict(fs.meta)
        merged.update(fs.items())
    meta["passes"] = len(plan.passes)
    return FactorSet(merged, meta)


def activation_estimate(model: nn.Module, batch_size: int, seq_len: int, dtype_bytes: int = 2) -> int:
    """Rough bytes for one batch's forward/backward: hidden states kept per layer plus the logits
    in fp32 (what usually dominates for large vocabularies)."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0
    inter = getattr(cfg, "intermediate_size", 0) or 4 * hidden
    layers = getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 0
    vocab = getattr(cfg, "vocab_size", 0) or 0
    tokens = batch_size * seq_len
    per_layer = tokens * (4 * hidden + 3 * inter) * dtype_bytes
    return int(layers * per_layer + 3 * tokens * vocab * 4 + math.ceil(0.1 * layers * per_layer))
