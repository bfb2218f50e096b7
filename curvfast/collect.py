"""K-FAC factor collection: A = E[x xᵀ] and G = E[g gᵀ] per tracked linear layer.

Conventions (recorded in every FactorSet's metadata as ``CONVENTION``):

- Causal LM: position t of a sequence is a sample iff tokens t and t+1 are both real
  (attention_mask) and, when labels are given, ``labels[t+1] != -100``.
- Classifier (logits of shape (B, C)): one sample per example, read at the CLS position 0.
- ``A`` = mean over samples of x xᵀ (x: the layer input at that position).
- ``G`` = mean over samples of g gᵀ, g = ∂(sum of the counted per-sample losses)/∂(layer output).
- fisher="true": each sample's target is drawn from the model's own softmax (seeded);
  fisher="empirical": the data's next token (or label).

Only activation gradients are formed: every parameter is frozen for the duration, the
backward pass starts at the tracked layers' outputs and so stops below the lowest of them.
The model is restored exactly (requires_grad flags, train/eval mode, no hooks) afterwards,
also when collection fails.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from curvfast import __version__, ops
from curvfast.modules import LayerSpec, ModuleSpec, dims, resolve_modules
from curvfast.packed import pack_lower, packed_size, unpack_lower

CONVENTION = (
    "causal_lm: position t counts iff tokens t and t+1 are real (and labels[t+1] != -100); "
    "classifier: one sample per example at position 0; "
    "A = mean over samples of x x^T; G = mean over samples of g g^T, "
    "g = d(sum of counted per-sample losses)/d(layer output)"
)
FISHER_TYPES = ("true", "empirical")


class NonFiniteError(FloatingPointError):
    """NaN or Inf met in an activation or gradient during collection."""


@dataclass
class Factors:
    """K-FAC factors of one weight ``W: (d_out, d_in)``.

    A: (d_in, d_in) float32, G: (d_out, d_out) float32, both symmetric, divided by ``tokens``.
    ``a_key`` names the group of modules that read the same input and share this A.
    """

    A: torch.Tensor
    G: torch.Tensor
    tokens: int
    a_key: str

    @property
    def d_in(self) -> int:
        return self.A.shape[0]

    @property
    def d_out(self) -> int:
        return self.G.shape[0]


@dataclass
class FactorSet(Mapping):
    """Mapping from module name to :class:`Factors`, plus metadata."""

    factors: dict[str, Factors]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Factors:
        return self.factors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    @property
    def tokens(self) -> int:
        return int(self.meta.get("tokens", 0))

    def __repr__(self) -> str:
        return f"FactorSet({len(self)} modules, {self.tokens} tokens, fisher={self.meta.get('fisher')!r})"


def _as_batch(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (list, tuple, int)):
        batch = {"input_ids": torch.as_tensor(batch)}
    if not isinstance(batch, Mapping):
        raise TypeError(f"a batch must be a dict (input_ids, attention_mask, labels) or a tensor of ids, "
                        f"got {type(batch).__name__}")
    out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    ids = out.get("input_ids")
    if ids is not None and ids.dim() == 1:
        out = {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) and v.dim() == 1 else v) for k, v in out.items()}
    return out


def _counted_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into (B*L) of counted positions, and their empirical targets."""
    ids = batch["input_ids"]
    B, L = ids.shape
    mask = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    valid = torch.zeros_like(real)
    valid[:, :-1] = real[:, :-1] & real[:, 1:]
    nxt = torch.zeros_like(ids)
    labels = batch.get("labels")
    nxt[:, :-1] = ids[:, 1:] if labels is None else labels[:, 1:]
    if labels is not None:
        valid[:, :-1] &= labels[:, 1:] != -100
    index = valid.reshape(-1).nonzero().squeeze(1)
    return index, nxt.reshape(-1)[index]


def _recomputing() -> bool:
    """True inside a backward pass, where gradient checkpointing replays forwards."""
    return torch._C._current_graph_task_id() != -1


class _Collector:
    """Hooks that accumulate A and G for a set of modules (one instance per collection)."""

    def __init__(self, model: nn.Module, names: list[str], backend: str, check_finite: bool,
                 acc_device: Optional[torch.device] = None, packed: bool = False):
        self.acc_device = acc_device
        self.packed = packed
        self.model = model
        self.names = names
        self.backend = backend
        self.check_finite = check_finite
        self.modules = {n: model.get_submodule(n) for n in names}
        self.a_owner: dict[str, str] = {}  # module -> name of the module whose A it shares
        self.a_acc: dict[str, torch.Tensor] = {}
        self.g_acc: dict[str, torch.Tensor] = {}
        self.index: Optional[torch.Tensor] = None  # flat sample positions (None: classifier)
        self.examples = 0  # examples in the current batch
        self.batch_no = 0
        self._seen_inputs: dict[int, tuple[torch.Tensor, str]] = {}
        self._calls: dict[str, int] = {}
        self._bad: list[tuple[str, str, torch.Tensor]] = []
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles: list[Any] = []

    # -- hooks -----------------------------------------------------------------------
    def install(self) -> None:
        for name, mod in self.modules.items():
            self.handles.append(mod.register_forward_pre_hook(self._pre_hook(name)))
            self.handles.append(mod.register_forward_hook(self._post_hook(name)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _rows(self, t: torch.Tensor, name: str, what: str) -> torch.Tensor:
        if self.index is None:  # classifier: position 0 (CLS) of each example
            rows = t.reshape(self.examples, -1, t.shape[-1])[:, 0]
        else:
            rows = t.reshape(-1, t.shape[-1]).index_select(0, self.index)
        if self.check_finite:
            self._bad.append((name, what, torch.isfinite(rows).all()))
        return rows

    def _pre_hook(self, name: str):
        def hook(module, args):
            if _recomputing():
                return None  # gradient checkpointing re-runs the forward inside backward
            x = args[0]
            self._calls[name] = self._calls.get(name, 0) + 1
            if self._calls[name] > 1:
                raise RuntimeError(f"module {name} was called more than once in one forward pass; "
                                   "curvfast counts one call per position (weight sharing is not supported)")
            seen = self._seen_inputs.get(id(x))
            owner = seen[1] if seen is not None and seen[0] is x else name
            if self.batch_no == 0:
                self.a_owner[name] = owner
            elif self.a_owner.get(name) != owner:
                raise RuntimeError(f"module {name} read a different input than in the first batch "
                                   f"(shared with {self.a_owner.get(name)!r} then, {owner!r} now)")
            if owner != name:
                return None
            self._seen_inputs[id(x)] = (x, name)
            self._queue(self.a_acc, name, self._rows(x.detach(), name, "input"))
            return None

        return hook

    def _post_hook(self, name: str):
        def hook(module, args, out):
            if _recomputing():
                return None
            if not torch.is_grad_enabled():
                raise RuntimeError(f"module {name} ran without autograd: reentrant gradient checkpointing is not "
                                   "supported; enable it with gradient_checkpointing_enable("
                                   "gradient_checkpointing_kwargs={'use_reentrant': False})")
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"module {name} returned {type(out).__name__}, expected a tensor")
            if not out.requires_grad:
                # No tracked layer below: start the graph here (a leaf), so backward stops here.
                out.requires_grad_(True)
            out.register_hook(self._grad_hook(name))
            return None

        return hook

    def _grad_hook(self, name: str):
        def hook(grad):
            self._queue(self.g_acc, name, self._rows(grad.detach(), name, "output gradient"))
            return None

        return hook

    # -- per batch ---------------------------------------------------------------------
    def _queue(self, accs: dict[str, torch.Tensor], name: str, rows: torch.Tensor) -> None:
        """Queue ``accs[name] += rowsᵀ rows`` for the next grouped flush."""
        acc = accs.get(name)
        if acc is None:
            acc = accs[name] = self._new_acc(rows)
        self._pending.append((acc, rows))

    def _new_acc(self, rows: torch.Tensor) -> torch.Tensor:
        d = rows.shape[1]
        dev = self.acc_device or rows.device
        pin = dev.type == "cpu" and rows.device.type == "cuda"
        shape = (packed_size(d),) if self.packed else (d, d)
        return torch.zeros(shape, dtype=torch.float32, device=dev, pin_memory=pin)

    def flush(self) -> None:
        """Apply queued updates in one grouped call (one launch per phase on GPU)."""
        if not self._pending:
            return
        accs, xs = zip(*self._pending)
        self._pending = []
        if not self.packed and accs[0].device == xs[0].device:
            ops.covariance_update_grouped(list(accs), list(xs), None, backend=self.backend)
            return
        # Accumulators live elsewhere or packed: one full scratch matrix next to the data at a
        # time, so device memory never holds more than one factor.
        for a, x in zip(accs, xs):
            scratch = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            ops.covariance_update(scratch, x, backend=self.backend)
            a.add_((pack_lower(scratch) if self.packed else scratch).to(a.device, non_blocking=False))

    def full(self, acc: torch.Tensor, d: int) -> torch.Tensor:
        """An accumulator as a full symmetric matrix."""
        return unpack_lower(acc, d) if acc.dim() == 1 else acc

    def end_batch(self) -> None:
        bad = self._bad
        self._bad = []
        if bad:
            flags = torch.stack([b[2] for b in bad]).cpu()
            if not bool(flags.all()):
                name, what, _ = bad[int((~flags).nonzero()[0])]
                raise NonFiniteError(f"NaN/Inf in the {what} of module {name!r} at batch {self.batch_no}; "
                                     "collection stopped (check the data and the model's dtype)")
        self._seen_inputs.clear()
        self._calls.clear()
        missing = [n for n in self.names if n not in self.g_acc or n not in self.a_owner]
        if missing:
            raise RuntimeError(f"modules {missing} took no part in the loss of batch {self.batch_no} "
                               "(are they used by the model's forward?)")
        self.batch_no += 1


def collect_factors(
    model: nn.Module,
    batches: Iterable[Any],
    modules: ModuleSpec = "mlp",
    layers: LayerSpec = None,
    fisher: str = "true",
    seed: Optional[int] = None,
    progress: bool = True,
    max_tokens: Optional[int] = None,
    backend: str = "auto",
    check_finite: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 1_000_000,
    accumulator_device: Optional[Union[str, torch.device]] = None,
    packed_accumulators: bool = False,
) -> FactorSet:
    """Collect K-FAC factors of ``modules`` over ``batches``.

    model: a transformers causal LM (logits (B, L, V)) or classifier (logits (B, C)).
    batches: iterable of dicts with ``input_ids`` (B, L) and optional ``attention_mask`` /
        ``labels``, or of id tensors; for classifiers, dicts of model inputs plus ``labels``.
    modules / layers: see :func:`curvfast.modules.resolve_modules`.
    fisher: "true" (targets sampled from the model; batch i draws from a generator seeded with
        (seed, i), so results do not depend on how the data is split or resumed) or "empirical".
    max_tokens: stop after the batch that reaches this many counted samples.
    checkpoint: file for resumable collection: the state is saved there atomically every
        ``checkpoint_every`` counted samples; if it exists when the call starts, collection
        resumes from it (the data iterable must yield the same batches again; the consumed
        ones are skipped). Removed once collection finishes.
    accumulator_device: where the fp32 accumulators live (default: with the activations);
        "cpu" keeps them in pinned host memory when the model runs on a GPU (see curvfast.plan).
    packed_accumulators: keep only the lower triangle of each accumulator (half the memory;
        each update then goes through one full scratch matrix at a time).
    Returns a :class:`FactorSet`; modules that read the same input share one A tensor.
    """
    names, seed = _prepare(model, modules, layers, fisher, seed)
    started = time.time()
    col, tokens = accumulate(model, batches, names, fisher, seed, progress=progress, max_tokens=max_tokens,
                             backend=backend, check_finite=check_finite, checkpoint=checkpoint,
                             checkpoint_every=checkpoint_every, accumulator_device=accumulator_device,
                             packed=packed_accumulators)
    if tokens == 0:
        raise ValueError("no counted positions in the data: every batch was empty or all padding "
                         "(a position counts when it and the next one are real tokens)")
    a_acc = {k: col.full(v, _d_in(model, k)) for k, v in col.a_acc.items()}
    g_acc = {k: col.full(v, dims(model.get_submodule(k))[0]) for k, v in col.g_acc.items()}
    return finalize(model, names, a_acc, g_acc, col.a_owner, tokens, fisher, seed, time.time() - started)


def _d_in(model: nn.Module, name: str) -> int:
    return dims(model.get_submodule(name))[1]


def _prepare(model, modules, layers, fisher, seed) -> tuple[list[str], int]:
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
    names = resolve_modules(model, modules, layers)
    if seed is None:
        seed = int(torch.initial_seed() % (2**62))
    return names, seed


def _batch_seed(seed: int, index: int) -> int:
    """Seed of the sampled targets of batch ``index`` (splitmix-style mixing, 63 bits)."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def accumulate(
    model: nn.Module,
    batches: Iterable[Any],
    names: list[str],
    fisher: str,
    seed: int,
    progress: bool = True,
    max_tokens: Optional[int] = None,
    backend: str = "auto",
    check_finite: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 1_000_000,
    shard: tuple[int, int] = (0, 1),
    accumulator_device: Optional[Union[str, torch.device]] = None,
    packed: bool = False,
) -> tuple["_Collector", int]:
    """Run the model over the batches and accumulate raw (undivided) factor sums.

    shard (rank, world): take only batches i with i % world == rank (their global index i
    still seeds the sampled targets, so shards add up to the single-process result).
    Returns the collector (``a_acc``, ``g_acc``, ``a_owner``) and the counted samples.
    """
    from curvfast.store import model_identity

    device = next(model.parameters()).device
    generator = torch.Generator(device=device) if fisher == "true" else None
    rank, world = shard
    col = _Collector(model, names, backend, check_finite,
                     torch.device(accumulator_device) if accumulator_device is not None else None, packed)
    tokens = 0
    consumed = 0  # global index of the next batch to read
    job = {"modules": names, "fisher": fisher, "seed": seed, "max_tokens": max_tokens, "shard": list(shard),
           "packed": packed,
           "model_fingerprint": model_identity(model)["model_fingerprint"]}
    if checkpoint is not None:
        from curvfast.resume import load_state

        state = load_state(checkpoint, job, device)
        if state is not None:
            col.a_acc, col.g_acc, col.a_owner = state.a_acc, state.g_acc, state.a_owner
            col.batch_no = state.batches
            tokens, consumed = state.tokens, state.batches
    last_saved = tokens
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens, initial=tokens, unit="tok", desc="collect factors", unit_scale=True,
                   dynamic_ncols=True)
    try:
        for p, _ in saved_flags:
            p.requires_grad_(False)
        # With gradient checkpointing on, stay in train mode (transformers only checkpoints in
        # training); dropout would then be active, so refuse models that have any.
        attr = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
            else "is_gradient_checkpointing"
        checkpointing = bool(getattr(model, attr, False))
        if checkpointing:
            _check_no_dropout(model)
        model.train(checkpointing)
        col.install()
        for i, raw in enumerate(batches):
            if i < consumed or i % world != rank:
                continue  # resuming past consumed batches, or another rank's batch
            if max_tokens is not None and tokens >= max_tokens:
                break
            consumed = i + 1
            if generator is not None:
                generator.manual_seed(_batch_seed(seed, i))
            count = _process_batch(model, col, _as_batch(raw, device), fisher, generator)
            tokens += count
            if bar is not None:
                bar.update(count)
            if checkpoint is not None and tokens - last_saved >= checkpoint_every:
                _save_checkpoint(checkpoint, job, col, tokens, consumed)
                last_saved = tokens
    finally:
        col.remove()
        col._pending.clear()
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.train(was_training)
        if bar is not None:
            bar.close()
    if checkpoint is not None and os.path.exists(checkpoint):
        os.unlink(checkpoint)
    return col, tokens


@torch.no_grad()
def sample_categorical(logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One draw per row from softmax(logits) by inverting the CDF: one uniform number per row
    (torch.multinomial draws one exponential per vocabulary entry, ~10× slower here).

    logits: (N, V) float. Returns (N,) int64.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    cdf = probs.cumsum_(dim=-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def _check_no_dropout(model: nn.Module) -> None:
    active = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        val = getattr(getattr(model, "config", None), key, 0.0)
        if isinstance(val, (int, float)) and val > 0:
            active.append(f"config.{key}={val}")
    if active:
        raise ValueError(f"gradient checkpointing keeps the model in train mode, but it has active dropout "
                         f"({', '.join(active[:3])}); set dropout to 0 or disable gradient checkpointing")


def _process_batch(model: nn.Module, col: "_Collector", batch: dict, fisher: str, generator) -> int:
    """Forward, loss over counted samples, backward; returns the number of counted samples."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    classifier = not ("input_ids" in batch and batch["input_ids"].dim() == 2 and "pixel_values" not in batch)
    if classifier:
        n = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
        index, targets = None, batch.get("labels")
        if fisher == "empirical" and targets is None:
            raise ValueError("fisher='empirical' on a classifier needs 'labels' in each batch")
        if n == 0:
            return 0
    else:
        index, targets = _counted_positions(batch)
        n = 0
        if index.numel() == 0:
            return 0
    col.index = index
    col.examples = n
    with torch.enable_grad():
        out = model(**inputs) if classifier else model(**inputs, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        sel = logits.float() if classifier else logits.reshape(-1, logits.shape[-1]).index_select(0, index).float()
        if fisher == "true":
            targets = sample_categorical(sel.detach(), generator)
        loss = F.cross_entropy(sel, targets.to(sel.device), reduction="sum")
        col.flush()
        loss.backward()
    col.flush()
    col.end_batch()
    return int(sel.shape[0])


def finalize(model: nn.Module, names: list[str], a_acc: dict[str, torch.Tensor], g_acc: dict[str, torch.Tensor],
             a_owner: dict[str, str], tokens: int, fisher: str, seed: int, seconds: float) -> FactorSet:
    """Divide raw sums by the sample count and wrap them, with metadata, as a FactorSet."""
    from curvfast.store import model_identity

    a_mean = {key: acc / tokens for key, acc in a_acc.items() if any(a_owner[n] == key for n in names)}
    factors = {}
    for name in names:
        key = a_owner[name]
        d_out, d_in = dims(model.get_submodule(name))
        A, G = a_mean[key], g_acc[name] / tokens
        if A.shape[0] != d_in or G.shape[0] != d_out:
            raise RuntimeError(f"factor shapes of {name} ({tuple(G.shape)}, {tuple(A.shape)}) do not match "
                               f"its weight ({d_out}, {d_in})")
        factors[name] = Factors(A=A, G=G, tokens=tokens, a_key=key)
    meta = {
        "fisher": fisher,
        "seed": seed,
        "tokens": tokens,
        "convention": CONVENTION,
        "loss_scale": "sum over counted samples; factors divided by the sample count",
        "curvfast_version": __version__,
        "seconds": round(seconds, 3),
        **model_identity(model, names),
    }
    return FactorSet(factors, meta)


def _save_checkpoint(path, job, col: "_Collector", tokens: int, consumed: int) -> None:
    from curvfast.resume import CollectionState, save_state

    save_state(path, CollectionState(job=job, a_acc=col.a_acc, g_acc=col.g_acc, a_owner=col.a_owner,
                                     tokens=tokens, batches=consumed))
