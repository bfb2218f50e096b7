"""Evaluation: how much a model still recites, and how well it still models language (SPEC §5).

- :func:`token_levenshtein` — token-level edit distance (explicit dynamic programme).
- :func:`recitation` — greedy-decode |S| tokens from a prefix P, score against the true
  suffix S: *strict* (d == 0), *loose* (1 − d/L ≥ 0.75), mean d/L.
- :func:`perplexity` — exp of the token-weighted mean NLL over all predicted tokens, plus the
  paper's variant (mean over batches of exp(batch mean loss)), labelled as such.
- :func:`mine_memorized` — which (prefix, suffix) windows a model has memorized: the
  teacher-forced argmax matches the suffix at every position (SPEC §5).
- :func:`ndcg_at_10` — agreement of an edited model's next-token top-10 with the original's.
- :func:`noisy_label_metrics` — the classifier metrics of SPEC §5 (memorized noisy labels,
  true-label accuracy on them, validation accuracy).

Greedy decoding is our own loop over the KV cache, not ``model.generate``: it never stops at
EOS (always |S| tokens) and it cannot be changed by a model's generation config.
"""
from __future__ import annotations

import inspect
import math
from collections import defaultdict
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

__all__ = ["token_levenshtein", "recitation", "perplexity", "LOOSE_THRESHOLD", "mine_memorized",
           "ndcg_at_k", "ndcg_at_10", "ndcg_from_logits", "predict_labels", "noisy_label_metrics",
           "noisy_label_metrics_from_predictions"]

#: a recitation counts as *loose* when 1 − d/L is at least this (SPEC §5)
LOOSE_THRESHOLD = 0.75

TokenSeq = Union[Sequence[int], torch.Tensor]


def _as_list(x: TokenSeq) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got a tensor of shape {tuple(x.shape)}")
        return [int(t) for t in x.tolist()]
    return [int(t) for t in x]


# --------------------------------------------------------------------------------------
# Edit distance
# --------------------------------------------------------------------------------------
def token_levenshtein(a: TokenSeq, b: TokenSeq) -> int:
    """Levenshtein distance between two token sequences (unit-cost insert/delete/substitute).

    O(len(a)·len(b)) time, O(min) memory: two rows of the classic DP table.
    """
    a, b = _as_list(a), _as_list(b)
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ta in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, tb in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1,                 # delete ta
                         cur[j - 1] + 1,              # insert tb
                         prev[j - 1] + (ta != tb))    # substitute (free when equal)
        prev = cur
    return prev[-1]


# --------------------------------------------------------------------------------------
# Model plumbing shared by recitation and perplexity
# --------------------------------------------------------------------------------------
def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _forward_kwargs(model: torch.nn.Module) -> tuple[str, bool]:
    """(name of the cache keyword, whether `logits_to_keep` is accepted).

    transformers ≥ 5.2x renamed ``past_key_values`` to ``cache``; older releases and
    custom models still use ``past_key_values``.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _get_cache(out: Any):
    for name in ("cache", "past_key_values"):
        try:
            c = out[name] if isinstance(out, Mapping) else getattr(out, name, None)
        except KeyError:
            c = None
        if c is not None:
            return c
    return None


def _logits(out: Any) -> torch.Tensor:
    return out["logits"] if isinstance(out, Mapping) else out.logits if hasattr(out, "logits") else out[0]


class _eval_mode:
    """Put a model in eval mode for a block; restore its training flag afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return it
    return tqdm(it, total=total, desc=desc, leave=False)


# --------------------------------------------------------------------------------------
# Recitation
# --------------------------------------------------------------------------------------
def _is_pair(seq: Any) -> bool:
    """A (prefix, suffix) pair is a 2-tuple of sequences (a 2-tuple of ints is a sequence)."""
    if not (isinstance(seq, tuple) and len(seq) == 2):
        return False
    first = seq[0]
    if isinstance(first, torch.Tensor):
        return first.dim() == 1
    return isinstance(first, Sequence)


def _split(seq: Any, i: int, prefix_len: Optional[int], suffix_len: int) -> tuple[list[int], list[int]]:
    """One input item → (P, S). Items are token sequences or (prefix, suffix) pairs."""
    if _is_pair(seq):
        p, s = _as_list(seq[0]), _as_list(seq[1])
    else:
        toks = _as_list(seq)
        if prefix_len is None:  # quote style: everything but the last suffix_len tokens
            if len(toks) <= suffix_len:
                raise ValueError(f"sequence {i} has {len(toks)} tokens; needs more than suffix_len={suffix_len}")
            p, s = toks[:-suffix_len], toks[-suffix_len:]
        else:
            if len(toks) < prefix_len + suffix_len:
                raise ValueError(
                    f"sequence {i} has {len(toks)} tokens; needs prefix_len + suffix_len = "
                    f"{prefix_len} + {suffix_len}. Pass shorter lengths or (prefix, suffix) pairs.")
            p, s = toks[:prefix_len], toks[prefix_len:prefix_len + suffix_len]
    if not p:
        raise ValueError(f"sequence {i} has an empty prefix; greedy decoding needs at least one token")
    if not s:
        raise ValueError(f"sequence {i} has an empty suffix")
    return p, s


@torch.no_grad()
def _greedy(model: torch.nn.Module, prefixes: torch.Tensor, n_new: int, use_cache: bool = True) -> torch.Tensor:
    """Greedy continuation of equal-length prefixes: (B, P) int64 → (B, n_new) int64.

    No padding, so no attention mask or position ids are needed: the cache length gives the
    position of every new token. Never stops early.
    """
    cache_kw, has_keep = _forward_kwargs(model)
    extra = {"logits_to_keep": 1} if has_keep else {}
    out_tokens = []
    if use_cache:
        out = model(input_ids=prefixes, use_cache=True, **extra)
        cache = _get_cache(out)
        nxt = _logits(out)[:, -1, :].argmax(dim=-1)
        out_tokens.append(nxt)
        for _ in range(n_new - 1):
            if cache is None:  # model without a cache: recompute below
                break
            out = model(input_ids=nxt[:, None], use_cache=True, **{cache_kw: cache}, **extra)
            cache = _get_cache(out)
            nxt = _logits(out)[:, -1, :].argmax(dim=-1)
            out_tokens.append(nxt)
        if len(out_tokens) == n_new:
            return torch.stack(out_tokens, dim=1)
    # No-cache path: recompute the whole context each step (also the test oracle's shape).
    ids = torch.cat([prefixes] + [t[:, None] for t in out_tokens], dim=1)
    while ids.shape[1] - prefixes.shape[1] < n_new:
        logits = _logits(model(input_ids=ids, use_cache=False, **extra))
        ids = torch.cat([ids, logits[:, -1, :].argmax(dim=-1, keepdim=True)], dim=1)
    return ids[:, prefixes.shape[1]:]


def recitation(
    model: torch.nn.Module,
    sequences: Sequence[Any],
    prefix_len: Optional[int] = 64,
    suffix_len: int = 48,
    batch_size: int = 32,
    progress: bool = True,
    return_details: bool = False,
    use_cache: bool = True,
) -> dict:
    """Greedy recitation of memorized sequences (SPEC §5).

    Args:
        model: a causal LM returning ``.logits`` (B, L, V); put in eval mode for the call.
        sequences: token-id sequences (lists or 1-D tensors), split as
            P = seq[:prefix_len], S = seq[prefix_len:prefix_len + suffix_len]
            (``prefix_len=None``: P = all but the last ``suffix_len`` tokens, the quote
            protocol); or ``(prefix, suffix)`` pairs, used as given.
        batch_size: sequences decoded together. Sequences are grouped by prefix length so
            that no batch needs padding.
        return_details: add ``details``, one dict per input (in input order) with
            ``generated``, ``suffix``, ``distance``, ``strict``, ``loose``.
        use_cache: decode with the KV cache (False recomputes the context every step).

    Returns:
        ``{"strict", "loose", "mean_dist", "n"}`` (+ ``details``): strict = fraction with
        d == 0, loose = fraction with 1 − d/L ≥ 0.75, mean_dist = mean of d/L, where d is the
        token Levenshtein distance of the |S| greedy tokens to S and L = |S|.
    """
    pairs = [_split(s, i, prefix_len, suffix_len) for i, s in enumerate(sequences)]
    n = len(pairs)
    if n == 0:
        return {"strict": float("nan"), "loose": float("nan"), "mean_dist": float("nan"), "n": 0,
                **({"details": []} if return_details else {})}
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")

    # Group by prefix length (no padding); within a group decode the longest suffix and cut,
    # which is exact because greedy decoding of token t never looks at tokens after t.
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (p, _) in enumerate(pairs):
        groups[len(p)].append(i)
    chunks = [idx[k:k + batch_size] for plen in sorted(groups) for idx in [groups[plen]]
              for k in range(0, len(idx), batch_size)]

    device = _model_device(model)
    generated: list[Optional[list[int]]] = [None] * n
    with _eval_mode(model):
        for chunk in _progress(chunks, len(chunks), "recitation", progress):
            pre = torch.tensor([pairs[i][0] for i in chunk], dtype=torch.long, device=device)
            n_new = max(len(pairs[i][1]) for i in chunk)
            gen = _greedy(model, pre, n_new, use_cache=use_cache).tolist()
            for row, i in zip(gen, chunk):
                generated[i] = row[:len(pairs[i][1])]

    details = []
    strict = loose = 0
    dist_sum = 0.0
    for (p, s), g in zip(pairs, generated):
        d = token_levenshtein(g, s)
        frac = d / len(s)
        is_strict, is_loose = d == 0, (1.0 - frac) >= LOOSE_THRESHOLD
        strict += is_strict
        loose += is_loose
        dist_sum += frac
        if return_details:
            details.append({"generated": g, "suffix": s, "distance": d, "strict": is_strict, "loose": is_loose})
    res = {"strict": strict / n, "loose": loose / n, "mean_dist": dist_sum / n, "n": n}
    if return_details:
        res["details"] = details
    return res


# --------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------
def _pad_right(seqs: list[list[int]], pad_id: int = 0) -> dict:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _as_batches(data: Any, batch_size: int) -> tuple[Iterable[dict], Optional[int]]:
    """Normalize perplexity inputs to an iterable of {input_ids, attention_mask} dicts.

    Accepted: a 2-D tensor of ids (split into rows of ``batch_size``); a list of token
    sequences (right-padded, masked); or an iterable of batches (dicts or 2-D tensors).
    """
    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            data = data[None]
        return ([{"input_ids": data[k:k + batch_size]} for k in range(0, data.shape[0], batch_size)],
                math.ceil(data.shape[0] / batch_size))
    if isinstance(data, Mapping):
        return [data], 1
    if isinstance(data, Sequence) and len(data) > 0 and not isinstance(data[0], (Mapping, torch.Tensor)):
        seqs = [_as_list(s) for s in data]
        return ([_pad_right(seqs[k:k + batch_size]) for k in range(0, len(seqs), batch_size)],
                math.ceil(len(seqs) / batch_size))
    if isinstance(data, Sequence) and len(data) > 0 and isinstance(data[0], torch.Tensor) and data[0].dim() == 1:
        seqs = [_as_list(s) for s in data]
        return ([_pad_right(seqs[k:k + batch_size]) for k in range(0, len(seqs), batch_size)],
                math.ceil(len(seqs) / batch_size))
    total = len(data) if hasattr(data, "__len__") else None
    return ({"input_ids": b} if isinstance(b, torch.Tensor) else b for b in data), total


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    sequences_or_batches: Any,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Held-out perplexity of a causal LM (SPEC §5).

    Every position t with a next token t+1 is predicted; positions where either t or t+1 is
    masked out by ``attention_mask`` are excluded.

    Args:
        sequences_or_batches: a list of token sequences (any lengths), a 2-D id tensor, or
            an iterable of batches (dicts with ``input_ids`` (B, L) and optional
            ``attention_mask`` (B, L), or (B, L) id tensors).

    Returns:
        ``perplexity``: exp(Σ NLL / Σ tokens) over all predicted tokens (token-weighted);
        ``perplexity_mean_batch_exp``: the paper's variant, mean over batches of
        exp(batch's token-mean NLL) (batches with no predicted token are skipped);
        ``nll``: the token-weighted mean NLL; ``tokens``: predicted tokens; ``batches``.
    """
    batches, total = _as_batches(sequences_or_batches, batch_size)
    device = _model_device(model)
    nll_sum = 0.0
    tokens = 0
    batch_exps: list[float] = []
    with _eval_mode(model):
        for b in _progress(batches, total, "perplexity", progress):
            ids = b["input_ids"].to(device)
            if ids.dim() == 1:
                ids = ids[None]
            mask = b.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            if ids.shape[1] < 2:
                continue
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            logits = _logits(out)[:, :-1, :].float()
            target = ids[:, 1:]
            valid = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
            ).view_as(target)
            s = float(nll[valid].double().sum())
            c = int(valid.sum())
            if c == 0:
                continue
            nll_sum += s
            tokens += c
            batch_exps.append(math.exp(s / c))
    if tokens == 0:
        raise ValueError("perplexity: no predicted tokens (every sequence is shorter than 2 unmasked tokens)")
    mean_nll = nll_sum / tokens
    return {
        "perplexity": math.exp(mean_nll),
        "perplexity_mean_batch_exp": sum(batch_exps) / len(batch_exps),
        "nll": mean_nll,
        "tokens": tokens,
        "batches": len(batch_exps),
    }


# --------------------------------------------------------------------------------------
# Memorized-set mining
# --------------------------------------------------------------------------------------
def _windows(sequences: Sequence[Any], prefix_len: Optional[int], suffix_len: int,
             stride: Optional[int]) -> tuple[list[tuple[int, int]], list[tuple[list[int], list[int]]]]:
    """(sequence index, start) and (P, S) of every window to test."""
    where: list[tuple[int, int]] = []
    pairs: list[tuple[list[int], list[int]]] = []
    for i, seq in enumerate(sequences):
        if stride is None or _is_pair(seq):
            where.append((i, 0))
            pairs.append(_split(seq, i, prefix_len, suffix_len))
            continue
        if prefix_len is None:
            raise ValueError("mine_memorized: sliding windows (stride) need a prefix_len")
        toks = _as_list(seq)
        w = prefix_len + suffix_len
        for start in range(0, len(toks) - w + 1, stride):
            where.append((i, start))
            pairs.append((toks[start:start + prefix_len], toks[start + prefix_len:start + w]))
    return where, pairs


@torch.no_grad()
def mine_memorized(
    model: torch.nn.Module,
    sequences: Sequence[Any],
    prefix_len: Optional[int] = 64,
    suffix_len: int = 48,
    stride: Optional[int] = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Find memorized windows by teacher-forced argmax (SPEC §5).

    A window (P, S) counts as memorized when, feeding P + S in one forward pass, the argmax
    of the logits at every position that predicts a token of S equals that token. This is
    exactly "greedy decoding from P reproduces S" (strict recitation), found with one forward
    pass instead of |S| decoding steps: with all earlier suffix tokens correct, each greedy
    step sees the same context as teacher forcing.

    Args:
        sequences: token sequences or ``(prefix, suffix)`` pairs, split as in :func:`recitation`.
        stride: None tests one window per sequence (its first ``prefix_len + suffix_len``
            tokens); an int slides windows of that length over each sequence with this step.
    Returns:
        ``{"memorized": [bool per window], "windows": [(sequence index, start)],
        "matched": [suffix positions matched per window], "fraction", "n",
        "sequences": [(P, S) of the memorized windows]}``.
    """
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be ≥ 1, got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    where, pairs = _windows(sequences, prefix_len, suffix_len, stride)
    n = len(pairs)
    matched: list[int] = [0] * n
    # Group by (|P|, |S|) so that no batch needs padding.
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (p, s) in enumerate(pairs):
        groups[(len(p), len(s))].append(i)
    chunks = [(key, idx[k:k + batch_size]) for key in sorted(groups) for idx in [groups[key]]
              for k in range(0, len(idx), batch_size)]
    device = _model_device(model)
    _, has_keep = _forward_kwargs(model)
    with _eval_mode(model):
        for (plen, slen), chunk in _progress(chunks, len(chunks), "mine", progress):
            ids = torch.tensor([pairs[i][0] + pairs[i][1] for i in chunk], dtype=torch.long, device=device)
            extra = {"logits_to_keep": slen + 1} if has_keep else {}
            logits = _logits(model(input_ids=ids, use_cache=False, **extra))
            # the logits at positions plen-1 .. plen+slen-2 predict the suffix tokens
            pred = logits[:, -(slen + 1):-1, :].argmax(dim=-1)
            hit = (pred == ids[:, plen:]).sum(dim=1).tolist()
            for i, h in zip(chunk, hit):
                matched[i] = int(h)
    memorized = [m == len(pairs[i][1]) for i, m in enumerate(matched)]
    return {"memorized": memorized, "windows": where, "matched": matched,
            "fraction": sum(memorized) / n if n else float("nan"), "n": n,
            "sequences": [pairs[i] for i in range(n) if memorized[i]]}


# --------------------------------------------------------------------------------------
# Agreement: nDCG@k of the edited model's top-k against the original's
# --------------------------------------------------------------------------------------
def ndcg_from_logits(logits_ref: torch.Tensor, logits_new: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Per-position nDCG@k of ``logits_new``'s top-k list against ``logits_ref``'s ranking.

    logits_ref, logits_new: (N, V). Relevance is graded by the reference (original) model's
    ranking: the token at reference rank r (0-based, r < k) has relevance k − r, every other
    token 0. DCG of the new model's top-k list = Σ_{q<k} rel(token at new rank q) / log2(q + 2);
    the ideal DCG is the reference's own list, Σ_{r<k} (k − r) / log2(r + 2). So the score is 1
    exactly when both models give the same top-k in the same order, 0 when the lists are
    disjoint, and swapping the top two costs more than swapping the last two. Returns (N,) float64.
    """
    if logits_ref.shape != logits_new.shape or logits_ref.dim() != 2:
        raise ValueError(f"ndcg: logits must be two (N, V) tensors of one shape, got {tuple(logits_ref.shape)} "
                         f"and {tuple(logits_new.shape)}")
    k = min(int(k), logits_ref.shape[1])
    if k < 1:
        raise ValueError("ndcg: k must be ≥ 1")
    top_ref = logits_ref.topk(k, dim=-1).indices                      # (N, k)
    top_new = logits_new.topk(k, dim=-1).indices                      # (N, k)
    gains = torch.arange(k, 0, -1, dtype=torch.float64, device=top_ref.device)   # k, k-1, ..., 1
    discount = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=top_ref.device) + 2.0)
    # rel[n, q] = gain of new-rank-q token in the reference list (0 if absent)
    eq = top_new.unsqueeze(2) == top_ref.unsqueeze(1)                # (N, k_new, k_ref)
    rel = (eq.double() * gains).sum(dim=2)
    dcg = (rel * discount).sum(dim=1)
    idcg = float((gains * discount).sum())
    return dcg / idcg


@torch.no_grad()
def ndcg_at_k(model_a: torch.nn.Module, model_b: torch.nn.Module, batches: Any, k: int = 10,
              batch_size: int = 8, progress: bool = True) -> dict:
    """Mean nDCG@k of ``model_b``'s (edited) next-token top-k against ``model_a``'s (original).

    Every real position (``attention_mask`` = 1) is scored, including each sequence's last
    one: the next-token distribution exists there too. See :func:`ndcg_from_logits` for the
    relevance definition. ``batches``: as for :func:`perplexity`.
    Returns ``{"ndcg": mean over positions, "top1_agreement": fraction of positions with the
    same argmax, "positions": N}``.
    """
    data, total = _as_batches(batches, batch_size)
    dev_a, dev_b = _model_device(model_a), _model_device(model_b)
    total_score = 0.0
    top1 = 0
    n = 0
    with _eval_mode(model_a), _eval_mode(model_b):
        for b in _progress(data, total, "ndcg", progress):
            ids = b["input_ids"]
            ids = ids[None] if ids.dim() == 1 else ids
            mask = b.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            la = _logits(model_a(input_ids=ids.to(dev_a), attention_mask=mask.to(dev_a), use_cache=False))
            lb = _logits(model_b(input_ids=ids.to(dev_b), attention_mask=mask.to(dev_b), use_cache=False))
            keep = mask.reshape(-1).bool()
            la = la.reshape(-1, la.shape[-1])[keep.to(la.device)].float()
            lb = lb.reshape(-1, lb.shape[-1])[keep.to(lb.device)].float().to(la.device)
            if la.shape[0] == 0:
                continue
            total_score += float(ndcg_from_logits(la, lb, k).sum())
            top1 += int((la.argmax(-1) == lb.argmax(-1)).sum())
            n += la.shape[0]
    if n == 0:
        raise ValueError("ndcg: no real positions in the data")
    return {"ndcg": total_score / n, "top1_agreement": top1 / n, "positions": n, "k": k}


def ndcg_at_10(model_a: torch.nn.Module, model_b: torch.nn.Module, batches: Any, batch_size: int = 8,
               progress: bool = True) -> dict:
    """:func:`ndcg_at_k` with k = 10 (SPEC §5): ``model_a`` original, ``model_b`` edited."""
    return ndcg_at_k(model_a, model_b, batches, k=10, batch_size=batch_size, progress=progress)


# --------------------------------------------------------------------------------------
# Classifiers with noisy labels (SPEC §5, vision)
# --------------------------------------------------------------------------------------
@torch.no_grad()
def predict_labels(model: torch.nn.Module, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Argmax class of an image classifier: pixel_values (N, C, H, W) → (N,) int64 (CPU)."""
    device = _model_device(model)
    out = []
    with _eval_mode(model):
        for k in range(0, pixel_values.shape[0], batch_size):
            logits = _logits(model(pixel_values=pixel_values[k:k + batch_size].to(device)))
            out.append(logits.argmax(dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def noisy_label_metrics_from_predictions(pred_train: torch.Tensor, noisy_labels: torch.Tensor,
                                         true_labels: torch.Tensor, pred_val: Optional[torch.Tensor] = None,
                                         val_labels: Optional[torch.Tensor] = None) -> dict:
    """The noisy-label metrics from predictions (all (N,) int tensors).

    The noisy set is the training examples whose given label differs from the true one.
    ``memorized``: fraction of the noisy set predicted with its noisy (given) label;
    ``true_label_acc``: fraction of the noisy set predicted with its true label;
    ``clean_train_acc``: accuracy on the rest of the training set; ``val_acc``: validation
    accuracy (when given). Fractions in [0, 1]; NaN for an empty set.
    """
    pred_train, noisy_labels, true_labels = (torch.as_tensor(t).reshape(-1) for t in
                                             (pred_train, noisy_labels, true_labels))
    if not (pred_train.shape == noisy_labels.shape == true_labels.shape):
        raise ValueError(f"noisy_label_metrics: shapes differ: predictions {tuple(pred_train.shape)}, noisy "
                         f"{tuple(noisy_labels.shape)}, true {tuple(true_labels.shape)}")
    noisy = noisy_labels != true_labels

    def frac(hit: torch.Tensor, sel: torch.Tensor) -> float:
        return float(hit[sel].double().mean()) if bool(sel.any()) else float("nan")

    out = {"memorized": frac(pred_train == noisy_labels, noisy),
           "true_label_acc": frac(pred_train == true_labels, noisy),
           "clean_train_acc": frac(pred_train == true_labels, ~noisy),
           "noisy": int(noisy.sum()), "train": int(noisy.numel())}
    if pred_val is not None:
        pv, vl = torch.as_tensor(pred_val).reshape(-1), torch.as_tensor(val_labels).reshape(-1)
        if pv.shape != vl.shape:
            raise ValueError(f"noisy_label_metrics: {pv.numel()} validation predictions but {vl.numel()} labels")
        out["val_acc"] = float((pv == vl).double().mean()) if pv.numel() else float("nan")
        out["val"] = int(pv.numel())
    return out


def noisy_label_metrics(model: torch.nn.Module, train_pixels: torch.Tensor, noisy_labels: torch.Tensor,
                        true_labels: torch.Tensor, val_pixels: Optional[torch.Tensor] = None,
                        val_labels: Optional[torch.Tensor] = None, batch_size: int = 256) -> dict:
    """SPEC §5 vision metrics of an image classifier (see
    :func:`noisy_label_metrics_from_predictions`). train_pixels: (N, C, H, W) float;
    noisy_labels: the labels it was trained on; true_labels: the clean ones."""
    pred_val = None if val_pixels is None else predict_labels(model, val_pixels, batch_size)
    return noisy_label_metrics_from_predictions(predict_labels(model, train_pixels, batch_size), noisy_labels,
                                                true_labels, pred_val, val_labels)
