"""``curvfast demo``: the whole method, offline, on a model small enough for a laptop CPU.

1. Train a byte-level BPE tokenizer on the standard library's ``pydoc_data.topics`` text.
2. Plant random "canary" token sequences, each repeated many times, in that text, plus a set of
   natural passages (windows of the training text itself, like the quotes of SPEC §4) duplicated
   as documents of their own, and train a small Llama on it until it recites them. Hold out
   ~10% of the clean text for perplexity.
   Model, tokenizer and data are cached under ``--cache-dir``, keyed by a hash of the
   settings, so a second run skips training.
3. Collect K-FAC factors with sampled labels (true Fisher) on *clean* training text (no
   canaries), eigendecompose, edit the MLP input projections (gate_proj, up_proj) of the
   upper half of the layers at ρ, and compare canary recitation and held-out perplexity
   before and after, with two references on the same matrices: SVD truncation at the same ρ,
   and zeroing them outright (the K-FAC edit removes most of their norm, so ablation is the
   honest comparison for what the *kept* high-curvature components buy).

Nothing is downloaded; the model is built from a config.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

__all__ = ["DemoSettings", "add_arguments", "run_demo", "settings_from_args", "format_table"]

#: bump when the training recipe changes in a way that invalidates cached models
DEMO_VERSION = 2
DEFAULT_CACHE_DIR = "~/.cache/curvfast/demo"
EOS = "<|endoftext|>"


@dataclass
class DemoSettings:
    """Everything that decides the demo's result. Fields in TRAIN_FIELDS key the cache."""

    # tokenizer and data
    vocab_size: int = 2048
    text_chars: Optional[int] = None   # cap on corpus characters (tests use a small slice)
    heldout_frac: float = 0.1
    # model (Llama)
    hidden_size: int = 256
    num_layers: int = 4
    intermediate_size: int = 688
    num_heads: int = 4
    seq_len: int = 128
    # canaries: random token ids, each planted `exposures` times in the training rows
    canaries: int = 64
    canary_len: int = 48
    exposures: int = 100
    # natural passages: windows of the clean training text, each also planted `passage_exposures`
    # times as a document; recited like quotes (SPEC §5): the last `passage_suffix` tokens from
    # EOS + the rest
    passages: int = 32
    passage_len: int = 40
    passage_suffix: int = 8
    passage_exposures: int = 100
    # training (AdamW, linear warmup, cosine decay). 730 steps: the 600 of the canary-only recipe
    # plus room for the passages, so the clean-text budget (~300k tokens) stays what it was (a
    # run that took the passages out of it lost edit quality: canaries 98% → 8% instead of → 0%)
    steps: int = 730
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.0
    seed: int = 0
    # edit
    rho: tuple[float, ...] = (0.9, 0.7)
    modules: str = "mlp_in"
    layers: str = "upper"
    factor_tokens: Optional[int] = 32768  # clean training tokens for the factors (None: all)
    factor_batch_size: int = 16
    # comparison arm (--compare): forget / held-out canary split, baselines at matched perplexity
    compare: bool = False
    # BalancedSubnet: λ and epochs as published (SPEC §6). Its scores start at |W|; at this
    # scale the published lr 0.3 left the mask where it started (measured: ‖ΔW‖/‖W‖ = 0.000 at
    # p ≤ 0.03, recitation unchanged), so the demo uses lr 300. p is swept to reach matched
    # perplexity (measured at lr 300 on the default model, held-out strict recitation: p = 0.1
    # to 0.2 → 100%, 0.25 → 47%, 0.3 → 9%, 0.4 → 0%; on the canary-only model of demo version 1,
    # magnitude pruning alone at p = 0.3 → 100%).
    bsn_p: tuple[float, ...] = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
    bsn_lam: float = 0.7
    bsn_epochs: int = 5
    bsn_lr: float = 300.0
    bsn_retain_rows: int = 64
    svd_rho: tuple[float, ...] = (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    # vision arm (--vision)
    vision: bool = False
    vision_sweep: bool = False
    # run
    cache_dir: str = DEFAULT_CACHE_DIR
    retrain: bool = False
    progress: bool = True
    json: Optional[str] = None
    device: str = "cpu"

    TRAIN_FIELDS = ("vocab_size", "text_chars", "heldout_frac", "hidden_size", "num_layers",
                    "intermediate_size", "num_heads", "seq_len", "canaries", "canary_len",
                    "exposures", "passages", "passage_len", "passage_exposures", "steps", "batch_size",
                    "lr", "warmup", "weight_decay", "seed")

    def cache_key(self, corpus_sha: str) -> str:
        d = {k: getattr(self, k) for k in self.TRAIN_FIELDS}
        d.update(corpus=corpus_sha, version=DEMO_VERSION)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# CLI wiring
# --------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options to ``parser`` (``curvfast demo --help``)."""
    d = DemoSettings()
    parser.add_argument("--cache-dir", default=d.cache_dir,
                        help="where the trained model, tokenizer and data are cached (default: %(default)s)")
    parser.add_argument("--rho", type=float, nargs="+", default=list(d.rho),
                        help="fraction of curvature mass kept; several values give several rows (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=d.steps, help="training steps (default: %(default)s)")
    parser.add_argument("--canaries", type=int, default=d.canaries, help="number of planted sequences (default: %(default)s)")
    parser.add_argument("--exposures", type=int, default=d.exposures,
                        help="times each canary appears in training (default: %(default)s)")
    parser.add_argument("--passages", type=int, default=d.passages,
                        help="natural passages (windows of the training text) also planted as documents and reported "
                             "beside the canaries; 0 for none (default: %(default)s)")
    parser.add_argument("--passage-exposures", type=int, default=d.passage_exposures,
                        help="times each natural passage is planted (default: %(default)s)")
    parser.add_argument("--layers", default=d.layers,
                        help="layers to edit: 'upper', 'all', '2,3', '-2:' ... (default: %(default)s)")
    parser.add_argument("--modules", default=d.modules,
                        help="modules to edit: mlp_in (gate+up), mlp_out, mlp, or globs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed for data, model and training (default: %(default)s)")
    parser.add_argument("--retrain", action="store_true", help="ignore the cache and train again")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON to FILE")
    parser.add_argument("--device", default=d.device, help="torch device for training and editing (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--compare", action="store_true",
                        help="split the canaries into a forget and a held-out half; compare the K-FAC edit with SVD "
                             "truncation and BalancedSubnet (trained on the forget half) at matched perplexity, "
                             "all scored on the held-out half")
    parser.add_argument("--vision", action="store_true",
                        help="also run the ViT arm: sklearn digits with 10%% random labels, fc1/fc2 of the first "
                             "and last blocks edited at rho 0.75, vs SVD (needs scikit-learn)")
    parser.add_argument("--vision-sweep", action="store_true",
                        help="also sweep the ViT arm over layer subsets (first,last / first / last / all) × rho "
                             "(0.5–0.95) from one factor collection, and name the best point (lowest memorized with "
                             "validation accuracy within 2 points)")
    return parser


def settings_from_args(args: Union[argparse.Namespace, dict, None] = None, **overrides: Any) -> DemoSettings:
    """DemoSettings from a parsed namespace and/or keyword overrides (unknown names are errors)."""
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    given.update(overrides)
    names = {f.name for f in dataclasses.fields(DemoSettings)}
    given = {k.replace("-", "_"): v for k, v in given.items()}
    # cli.py may put its own keys (command, func, ...) into the namespace: ignore those only
    if isinstance(args, argparse.Namespace):
        if given.get("quiet"):  # the CLI's global -q/--quiet
            given["progress"] = False
        given = {k: v for k, v in given.items() if k in names or k in overrides}
    unknown = set(given) - names
    if unknown:
        raise TypeError(f"unknown demo settings: {sorted(unknown)}; known: {sorted(names)}")
    s = DemoSettings(**given)
    if isinstance(s.rho, (int, float)):
        s.rho = (float(s.rho),)
    s.rho = tuple(float(r) for r in s.rho)
    s.bsn_p = tuple(float(p) for p in s.bsn_p)
    s.svd_rho = tuple(float(r) for r in s.svd_rho)
    for r in s.rho:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"--rho must be in [0, 1], got {r}")
    if s.canary_len < 2 or s.canary_len + 2 > s.seq_len:
        raise ValueError(f"canary_len must be in [2, seq_len - 2], got {s.canary_len} with seq_len={s.seq_len}")
    if s.steps < 1 or s.canaries < 1 or s.exposures < 1:
        raise ValueError("steps, canaries and exposures must be ≥ 1")
    if s.passages < 0 or s.passage_exposures < 1:
        raise ValueError("passages must be ≥ 0 and passage_exposures ≥ 1")
    if s.passages and not (1 <= s.passage_suffix < s.passage_len <= s.seq_len - 2):
        raise ValueError(f"need 1 ≤ passage_suffix < passage_len ≤ seq_len - 2, got {s.passage_suffix}, "
                         f"{s.passage_len}, seq_len={s.seq_len}")
    return s


# --------------------------------------------------------------------------------------
# Data: corpus, tokenizer, canaries, training rows
# --------------------------------------------------------------------------------------
def corpus_documents(text_chars: Optional[int] = None) -> list[str]:
    """The stdlib's pydoc topic texts (~465k characters of English), in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    if text_chars is not None:
        out, n = [], 0
        for d in docs:
            if n >= text_chars:
                break
            out.append(d[:text_chars - n])
            n += len(out[-1])
        docs = out
    return docs


def train_tokenizer(docs: Sequence[str], vocab_size: int):
    """Byte-level BPE trained on ``docs``, wrapped as a PreTrainedTokenizerFast (EOS = pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None)


def split_clean(docs: Sequence[str], tokenizer, heldout_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams (train, held-out): documents shuffled, joined with EOS, the tail held out."""
    from curvfast.data import tokenize_documents

    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    stream = tokenize_documents([docs[i] for i in order], tokenizer)
    n_held = int(round(heldout_frac * stream.numel()))
    return stream[:stream.numel() - n_held], stream[stream.numel() - n_held:]


def make_canaries(n: int, length: int, vocab_size: int, exclude: Sequence[int], seed: int) -> torch.Tensor:
    """(n, length) random token ids, uniform over the vocabulary minus ``exclude`` (special tokens)."""
    allowed = torch.tensor(sorted(set(range(vocab_size)) - set(exclude)), dtype=torch.long)
    g = torch.Generator().manual_seed(seed + 1)
    return allowed[torch.randint(0, allowed.numel(), (n, length), generator=g)]


def natural_passages(stream: torch.Tensor, n: int, length: int, eos_id: int, seed: int) -> torch.Tensor:
    """(n, length) distinct, non-overlapping windows of ``stream`` that do not cross a document
    boundary (contain no EOS), drawn at seeded random positions; (0, length) for n = 0."""
    if n == 0:
        return torch.empty((0, length), dtype=torch.long)
    g = torch.Generator().manual_seed(seed + 4)
    blocks = stream.numel() // length                      # aligned windows never overlap
    ok = (~stream[:blocks * length].view(blocks, length).eq(eos_id).any(dim=1)).nonzero().flatten().tolist()
    if len(ok) < n:
        raise ValueError(f"the training text has only {len(ok)} EOS-free windows of {length} tokens; "
                         f"ask for fewer passages")
    pick = torch.tensor(ok)[torch.randperm(len(ok), generator=g)[:n]].sort().values
    return torch.stack([stream[b * length:(b + 1) * length] for b in pick.tolist()])


def training_rows(clean: torch.Tensor, canaries: torch.Tensor, exposures: int, rows: int, seq_len: int,
                  eos_id: int, seed: int, passages: Optional[torch.Tensor] = None,
                  passage_exposures: int = 0) -> torch.Tensor:
    """(rows, seq_len) training rows: clean text (cycled) with every canary planted ``exposures``
    times and every passage (if given) ``passage_exposures`` times.

    Each planted copy is whole (never cut by a row boundary) and preceded by EOS, like a
    document of its own; copies are spread uniformly at random over the rows.
    """
    g = torch.Generator().manual_seed(seed + 2)
    seqs = [c for c in canaries]
    counts = [exposures] * len(seqs)
    if passages is not None and passages.numel():
        seqs += [p for p in passages]
        counts += [passage_exposures] * passages.shape[0]
    n_copies = sum(counts)
    longest = max(int(q.numel()) for q in seqs)
    per_row = max(1, -(-n_copies // rows))                 # copies a row must hold at most
    if per_row * (longest + 1) > seq_len:
        raise ValueError(f"{canaries.shape[0]} canaries × {exposures} exposures"
                         + (f" and {passages.shape[0]} passages × {passage_exposures}" if len(seqs) > len(canaries) else "")
                         + f" do not fit in {rows} rows of {seq_len} tokens; train more steps or plant fewer")
    slots = torch.arange(rows).repeat_interleave(per_row)     # ≥ n_copies slots, ≤ per_row per row
    slots = slots[torch.randperm(slots.numel(), generator=g)][:n_copies]
    which = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(counts))
    which = which[torch.randperm(n_copies, generator=g)]
    planted: list[list[int]] = [[] for _ in range(rows)]
    for r, c in zip(slots.tolist(), which.tolist()):
        planted[r].append(c)
    out = torch.empty((rows, seq_len), dtype=torch.long)
    pos = 0
    n_clean = clean.numel()
    for r in range(rows):
        k = len(planted[r])
        n_text = seq_len - sum(int(seqs[c].numel()) + 1 for c in planted[r])
        idx = (torch.arange(pos, pos + n_text) % n_clean)
        pos = (pos + n_text) % n_clean
        text = clean[idx]
        # insertion points in the text, sorted; planted copy j goes before text[cut_j]
        cuts = torch.sort(torch.randint(0, n_text + 1, (k,), generator=g)).values.tolist()
        pieces, prev = [], 0
        for cut, c in zip(cuts, planted[r]):
            pieces += [text[prev:cut], torch.tensor([eos_id]), seqs[c]]
            prev = cut
        pieces.append(text[prev:])
        out[r] = torch.cat(pieces)
    return out


# --------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------
def build_model(s: DemoSettings, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                      num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                      num_key_value_heads=s.num_heads, max_position_embeddings=s.seq_len,
                      tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    torch.manual_seed(s.seed)
    return LlamaForCausalLM(cfg)


def train(model, rows: torch.Tensor, s: DemoSettings) -> list[float]:
    """AdamW over ``rows`` in order (they are already shuffled), one batch per step. Returns losses."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)

    def lr_at(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        t = (step - s.warmup) / max(1, s.steps - s.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    bar = tqdm(range(s.steps), desc="train", disable=not s.progress, dynamic_ncols=True)
    for step in bar:
        x = rows[step * s.batch_size:(step + 1) * s.batch_size].to(s.device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------
def _corpus_sha(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _save(path: Path, model, tokenizer, tensors: dict, meta: dict) -> None:
    """Write to a temporary sibling and rename, so a killed run never leaves half a cache."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp / "model")  # (weights are saved from any device)
        tokenizer.save_pretrained(tmp / "tokenizer")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "data.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load(path: Path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    meta = json.loads((path / "meta.json").read_text())
    model = LlamaForCausalLM.from_pretrained(path / "model")
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
    tensors = load_file(str(path / "data.safetensors"))
    return model, tokenizer, tensors, meta


def prepare(s: DemoSettings, log=print) -> tuple[Any, Any, dict, dict]:
    """Trained model, tokenizer, data tensors and metadata: from the cache, or trained now."""
    docs = corpus_documents(s.text_chars)
    key = s.cache_key(_corpus_sha(docs))
    path = Path(s.cache_dir).expanduser() / key
    if path.exists() and not s.retrain:
        try:
            model, tokenizer, tensors, meta = _load(path)
            model.to(s.device)
            meta["cached"] = True
            log(f"loaded cached model {path}")
            return model, tokenizer, tensors, meta
        except Exception as e:  # a damaged cache is rebuilt, not fatal
            log(f"cache at {path} unreadable ({type(e).__name__}: {e}); training again")

    timings = {}
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(docs, s.vocab_size)
    eos_id = tokenizer.eos_token_id
    train_ids, held_ids = split_clean(docs, tokenizer, s.heldout_frac, s.seed)
    if held_ids.numel() < 2 * s.seq_len:
        raise ValueError(f"held-out text has only {held_ids.numel()} tokens; use more text or a larger heldout_frac")
    canaries = make_canaries(s.canaries, s.canary_len, len(tokenizer), [eos_id], s.seed)
    passages = natural_passages(train_ids, s.passages, s.passage_len, eos_id, s.seed)
    rows = training_rows(train_ids, canaries, s.exposures, s.steps * s.batch_size, s.seq_len, eos_id, s.seed,
                         passages=passages, passage_exposures=s.passage_exposures)
    timings["data_s"] = time.perf_counter() - t0

    model = build_model(s, len(tokenizer), eos_id).to(s.device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"training a {n_params / 1e6:.2f}M-parameter Llama ({s.num_layers} layers, hidden {s.hidden_size}, "
        f"MLP {s.intermediate_size}) for {s.steps} steps of {s.batch_size}×{s.seq_len} tokens; "
        f"{s.canaries} canaries × {s.exposures} exposures and {s.passages} natural passages × "
        f"{s.passage_exposures} planted in {train_ids.numel()} clean tokens "
        f"(vocab {len(tokenizer)})")
    t0 = time.perf_counter()
    losses = train(model, rows, s)
    timings["train_s"] = time.perf_counter() - t0
    canary_tokens = s.canaries * s.exposures * (s.canary_len + 1)
    passage_tokens = s.passages * s.passage_exposures * (s.passage_len + 1)
    meta = {
        "key": key, "params": n_params, "vocab": len(tokenizer), "clean_train_tokens": int(train_ids.numel()),
        "heldout_tokens": int(held_ids.numel()), "training_tokens": int(rows.numel()),
        "canary_token_fraction": canary_tokens / rows.numel(),
        "passage_token_fraction": passage_tokens / rows.numel(),
        "clean_epochs": (rows.numel() - canary_tokens - passage_tokens) / train_ids.numel(),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]), "timings": timings,
        "settings": {k: getattr(s, k) for k in s.TRAIN_FIELDS},
    }
    tensors = {"canaries": canaries, "passages": passages, "clean_train": train_ids, "heldout": held_ids}
    _save(path, model, tokenizer, tensors, meta)
    log(f"cached at {path}")
    meta["cached"] = False
    return model, tokenizer, tensors, meta


# --------------------------------------------------------------------------------------
# Evaluation rows
# --------------------------------------------------------------------------------------
def canary_pairs(canaries: torch.Tensor, eos_id: int) -> list[tuple[list[int], list[int]]]:
    """(prefix, suffix) per canary: prefix = EOS + first half, suffix = second half.

    Canaries are planted as documents, so in training each follows an EOS; the prefix keeps
    that boundary token. (Without it a 4-layer model trained for minutes does not recognize
    a canary that starts at position 0: measured, strict 97% with EOS vs 0% without.)
    """
    half = canaries.shape[1] // 2
    return [([eos_id] + c[:half], c[half:]) for c in canaries.tolist()]


def passage_pairs(passages: torch.Tensor, suffix: int, eos_id: int) -> list[tuple[list[int], list[int]]]:
    """(prefix, suffix) per passage, the quote protocol of SPEC §5: prefix = EOS + all but the
    last ``suffix`` tokens, suffix = the last ``suffix`` tokens."""
    return [([eos_id] + p[:-suffix], p[-suffix:]) for p in passages.tolist()]


def _measure(model, canaries: torch.Tensor, eos_id: int, held_batches, passages: Optional[torch.Tensor] = None,
             passage_suffix: int = 8) -> dict:
    """Canary recitation, held-out perplexity and, when passages are given, their recitation
    (keys ``passages_strict``, ``passages_loose``, ``passages_mean_dist``, ``passages_n``)."""
    from curvfast.evaluate import perplexity, recitation

    rec = recitation(model, canary_pairs(canaries, eos_id), batch_size=64, progress=False)
    ppl = perplexity(model, held_batches, progress=False)
    out = {"strict": rec["strict"], "loose": rec["loose"], "mean_dist": rec["mean_dist"], "n": rec["n"],
           "perplexity": ppl["perplexity"], "perplexity_mean_batch_exp": ppl["perplexity_mean_batch_exp"],
           "heldout_tokens": ppl["tokens"]}
    if passages is not None and passages.shape[0]:
        pr = recitation(model, passage_pairs(passages, passage_suffix, eos_id), batch_size=64, progress=False)
        out.update(passages_strict=pr["strict"], passages_loose=pr["loose"], passages_mean_dist=pr["mean_dist"],
                   passages_n=pr["n"])
    return out


def _replaced(model, names: list[str], new_weight, measure) -> dict:
    """measure() with each named module's weight W replaced by new_weight(W); restored after.

    Adds ``rel_change``: the mean over modules of ‖W' − W‖/‖W‖.
    """
    saved, rel = {}, []
    try:
        with torch.no_grad():
            for n in names:
                W = model.get_submodule(n).weight
                saved[n] = W.detach().clone()
                new = new_weight(W)
                rel.append(float((new.float() - W.float()).norm() / W.float().norm().clamp_min(1e-30)))
                W.copy_(new)
        out = measure()
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                model.get_submodule(n).weight.copy_(w)
    out["rel_change"] = sum(rel) / len(rel) if rel else 0.0
    return out


def format_table(rows: list[dict]) -> str:
    """Canary columns (strict, loose, mean d/L), natural-passage columns when measured, held-out
    perplexity and its change against the first row, mean ‖ΔW‖/‖W‖."""
    psg = all("passages_strict" in r for r in rows)
    head = (f"{'model':<30} {'strict':>7} {'loose':>7} {'mean d/L':>9} "
            + (f"{'psg strict':>10} {'psg loose':>9} " if psg else "")
            + f"{'held-out ppl':>13} {'Δppl':>7} {'|ΔW|/|W|':>9}")
    lines = [head, "-" * len(head)]
    base = rows[0]["perplexity"]
    for r in rows:
        dp = "" if r is rows[0] else f"{100 * (r['perplexity'] / base - 1):+.1f}%"
        lines.append(f"{r['name']:<30} {r['strict']:>7.1%} {r['loose']:>7.1%} {r['mean_dist']:>9.3f} "
                     + (f"{r['passages_strict']:>10.1%} {r['passages_loose']:>9.1%} " if psg else "")
                     + f"{r['perplexity']:>13.2f} {dp:>7} {r.get('rel_change', 0.0):>9.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Comparison arm: K-FAC vs SVD vs BalancedSubnet at matched perplexity (--compare)
# --------------------------------------------------------------------------------------
def split_canaries(n: int, seed: int) -> tuple[list[int], list[int]]:
    """(forget, held-out) canary indices: a seeded half each. BalancedSubnet trains on the
    forget half; every method is scored on the held-out half."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 3)).tolist()
    return sorted(perm[:n // 2]), sorted(perm[n // 2:])


def _closest(rows: list[dict], target: float) -> dict:
    """The row whose perplexity is closest to ``target`` (relative), ties → lower strict."""
    return min(rows, key=lambda r: (abs(math.log(r["perplexity"] / target)), r["strict"]))


def operating_point(kfac: list[dict], base: dict, bar: float = 0.1) -> dict:
    """The K-FAC row the baselines are matched to: the mildest edit (lowest perplexity) whose
    strict recitation is ≤ ``bar`` × the baseline's; if no ρ reaches that, the lowest recitation
    (ties → lower perplexity)."""
    ok = [r for r in kfac if r["strict"] <= bar * base["strict"]]
    if ok:
        return min(ok, key=lambda r: r["perplexity"])
    return min(kfac, key=lambda r: (r["strict"], r["perplexity"]))


def compare_arm(model, canaries: torch.Tensor, eos_id: int, held, clean: torch.Tensor, eigen, s: DemoSettings,
                log=print, passages: Optional[torch.Tensor] = None) -> dict:
    """Baseline, K-FAC at each ρ, and SVD / BalancedSubnet settings swept to the perplexity of the
    K-FAC operating point (:func:`operating_point`); each baseline is picked at the closest
    perplexity. Canaries are scored on the held-out half; natural passages (never trained on by
    BalancedSubnet) are all scored. The model is restored after every setting."""
    import curvfast
    from curvfast.baselines import balanced_subnet, mixed_batches, svd_model
    from curvfast.data import pack

    forget, heldout = split_canaries(canaries.shape[0], s.seed)
    held_can = canaries[heldout]
    names = list(eigen)

    def measure():
        return _measure(model, held_can, eos_id, held, passages, s.passage_suffix)

    def scored(res, **extra):
        try:
            out = dict(**extra, **measure())
        finally:
            res.undo()
        out["rel_change"] = sum(r["rel_change"] for r in res.reports.values()) / len(res.reports)
        return out

    t0 = time.perf_counter()
    base = dict(name="original", method="none", **measure(), rel_change=0.0)
    kfac = [scored(curvfast.edit_model(model, eigen, rho=r), name=f"K-FAC edit, rho={r:g}", method="kfac", rho=r)
            for r in s.rho]
    point = operating_point(kfac, base)
    target = point["perplexity"]
    svd = []
    for r in sorted(s.svd_rho, reverse=True):  # perplexity rises as ρ falls: stop once well past the target
        svd.append(scored(svd_model(model, names, rho=r), name=f"SVD, rho={r:g}", method="svd", rho=r))
        if svd[-1]["perplexity"] > target * 1.05:
            break
    t_svd = time.perf_counter() - t0
    forget_seqs = [[eos_id] + canaries[i].tolist() for i in forget]
    rows = pack(clean, s.seq_len)["input_ids"][:s.bsn_retain_rows].tolist()
    batches = mixed_batches(forget_seqs, rows, batch_size=16, seed=s.seed, pad_id=eos_id)
    bsn = []
    t0 = time.perf_counter()
    for p in sorted(s.bsn_p):  # perplexity rises with p
        res = balanced_subnet(model, names, batches, p=p, lam=s.bsn_lam, epochs=s.bsn_epochs, lr=s.bsn_lr,
                              progress=s.progress)
        bsn.append(scored(res, name=f"BSN, p={p:g}", method="bsn", p=p))
        # forget-split recitation shows what BSN learned on the data it saw
        log(f"  BalancedSubnet p={p:g}: held-out strict {bsn[-1]['strict']:.1%}, ppl {bsn[-1]['perplexity']:.2f}")
        if bsn[-1]["perplexity"] > target * 1.05:
            break
    t_bsn = time.perf_counter() - t0
    best_svd, best_bsn = _closest(svd, target), _closest(bsn, target)
    matched = [base, point, dict(best_svd, name=best_svd["name"] + " (matched)"),
               dict(best_bsn, name=best_bsn["name"] + " (matched)")]
    return {"forget": forget, "heldout": heldout, "target_perplexity": target,
            "matched": matched, "kfac": kfac, "svd": svd, "bsn": bsn,
            "settings": {"bsn_lam": s.bsn_lam, "bsn_epochs": s.bsn_epochs, "bsn_lr": s.bsn_lr,
                         "bsn_retain_rows": s.bsn_retain_rows, "bsn_modules": names},
            "timings": {"kfac_svd_s": t_svd, "bsn_s": t_bsn},
            "summary": {key: _summary(r) for key, r in zip(("baseline", "kfac", "svd", "bsn"), matched)}}


def _summary(r: dict) -> dict:
    return {k: r[k] for k in ("strict", "loose", "perplexity", "passages_strict", "passages_loose") if k in r}


def run_demo(args: Union[argparse.Namespace, dict, None] = None, **overrides: Any) -> dict:
    """Run the demo; print the before/after table; return (and optionally write) the results.

    ``args``: the namespace from a parser given :func:`add_arguments`, or a dict; keyword
    overrides take precedence (tests use them for tiny settings).
    """
    import curvfast
    from curvfast.data import Batches, pack

    s = settings_from_args(args, **overrides)
    torch.manual_seed(s.seed)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model, tokenizer, tensors, meta = prepare(s, log)
    timings["prepare_s"] = time.perf_counter() - t0
    canaries = tensors["canaries"]
    passages = tensors.get("passages")
    eos_id = tokenizer.eos_token_id
    held = Batches(pack(tensors["heldout"], s.seq_len), batch_size=16)

    def measure() -> dict:
        return _measure(model, canaries, eos_id, held, passages, s.passage_suffix)

    clean = tensors["clean_train"]
    if s.factor_tokens is not None:
        clean = clean[:s.factor_tokens]
    factor_batches = Batches(pack(clean, s.seq_len), batch_size=s.factor_batch_size)

    t0 = time.perf_counter()
    rows = [dict(name="original", method="none", **measure(), rel_change=0.0)]
    timings["eval_original_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    factors = curvfast.collect_factors(model, factor_batches, modules=s.modules, layers=s.layers,
                                       fisher="true", seed=s.seed, progress=s.progress)
    timings["factors_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    eigen = curvfast.eigendecompose(factors, progress=s.progress)
    timings["eigen_s"] = time.perf_counter() - t0
    names = list(eigen)
    log(f"factors from {factor_batches.tokens} clean tokens (true Fisher); editing {len(names)} matrices: "
        + ", ".join(names))

    edits = {}
    for rho in s.rho:
        t0 = time.perf_counter()
        res = curvfast.edit_model(model, eigen, rho=rho)
        try:
            rows.append(dict(name=f"K-FAC edit, rho={rho:g}", method="kfac", rho=rho,
                             **measure()))
        finally:
            res.undo()
        edits[f"{rho:g}"] = res.reports
        timings[f"kfac_rho{rho:g}_s"] = time.perf_counter() - t0

        rows[-1]["rel_change"] = sum(r["rel_change"] for r in res.reports.values()) / len(res.reports)

        t0 = time.perf_counter()
        rows.append(dict(name=f"SVD truncation, rho={rho:g}", method="svd", rho=rho,
                         **_replaced(model, names, lambda W: curvfast.svd_truncate(W, rho),
                                     measure)))
        timings[f"svd_rho{rho:g}_s"] = time.perf_counter() - t0

    # Reference: delete the edited matrices outright. The K-FAC edit at small ρ removes most
    # of their norm, so this row tells how much of its effect plain ablation would give.
    t0 = time.perf_counter()
    rows.append(dict(name="zeroed (ablation)", method="zero", rho=0.0,
                     **_replaced(model, names, torch.zeros_like, measure)))
    timings["zero_s"] = time.perf_counter() - t0

    # Spectra of the edited matrices and activation-energy band shares (paper §4): held-out
    # text vs the canaries, for `curvfast report`. Cheap: forward passes only.
    from curvfast.bands import band_energy

    spectra = {n: {"evals_A": eigen[n].evals_A.tolist(), "evals_G": eigen[n].evals_G.tolist()} for n in names}
    def as_documents(seqs: torch.Tensor) -> list[dict]:   # one batch, each row after EOS as planted
        return [{"input_ids": torch.cat([torch.full((seqs.shape[0], 1), eos_id), seqs], dim=1)}]

    bands = {"held-out text": band_energy(model, eigen, held), "canaries": band_energy(model, eigen, as_documents(canaries))}
    if passages is not None and passages.shape[0]:
        bands["natural passages"] = band_energy(model, eigen, as_documents(passages))

    comparison = None
    if s.compare:
        t0 = time.perf_counter()
        log("comparison arm: SVD and BalancedSubnet swept to the K-FAC edit's perplexity, held-out canary split")
        comparison = compare_arm(model, canaries, eos_id, held, tensors["clean_train"], eigen, s, log, passages)
        timings["compare_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    half = s.canary_len // 2
    table = format_table(rows)
    print(f"\ncurvfast demo — {meta['params'] / 1e6:.2f}M-parameter Llama, {s.canaries} canaries of "
          f"{s.canary_len} random tokens (prefix: EOS + first {half}, suffix: last {s.canary_len - half}), "
          f"edited: {s.modules} of layers {s.layers} ({len(names)} matrices)\n")
    print(table)
    psg = (f"; psg: {passages.shape[0]} natural passages of {s.passage_len} tokens planted {s.passage_exposures}× "
           f"(prefix: EOS + first {s.passage_len - s.passage_suffix}, suffix: last {s.passage_suffix})"
           if passages is not None and passages.shape[0] else "")
    print(f"\nstrict: suffix reproduced exactly; loose: 1 − d/L ≥ 0.75{psg}; held-out ppl: exp of token-mean NLL over "
          f"{rows[0]['heldout_tokens']} tokens; |ΔW|/|W|: mean relative change of the edited matrices.\n"
          f"{'cached model' if meta['cached'] else 'trained now'}; total {timings['total_s']:.0f} s.")
    if comparison is not None:
        print(f"\nAt matched perplexity — {len(comparison['heldout'])} held-out canaries (BalancedSubnet trained on the "
              f"other {len(comparison['forget'])}; the K-FAC edit saw no canary; natural passages seen by neither). "
              f"K-FAC point: the mildest ρ with strict ≤ 10% of the original's; baselines: the setting with the "
              f"closest perplexity:\n")
        print(format_table(comparison["matched"]))
    result = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()},
              "model": {k: meta[k] for k in ("key", "params", "vocab", "clean_train_tokens", "heldout_tokens",
                                             "training_tokens", "canary_token_fraction", "passage_token_fraction", "clean_epochs",
                                             "final_loss") if k in meta},
              "cached": meta["cached"], "train_timings": meta.get("timings", {}),
              "edited_modules": names, "factor_tokens": factor_batches.tokens,
              "rows": rows, "edit_reports": edits, "timings": timings}
    result["spectra"] = spectra
    result["bands"] = bands
    first = next(r for r in rows if r["method"] == "kfac")
    svd_first = next(r for r in rows if r["method"] == "svd")
    result["lm"] = comparison["summary"] if comparison is not None else {
        key: _summary(r) for key, r in (("baseline", rows[0]), ("kfac", first), ("svd", svd_first))}
    if comparison is not None:
        result["comparison"] = comparison
    if s.vision:
        from curvfast.demo_vision import VisionSettings, run_vision

        t0 = time.perf_counter()
        vis = run_vision(VisionSettings(cache_dir=s.cache_dir, retrain=s.retrain, progress=s.progress,
                                        seed=s.seed), log=log)
        timings["vision_s"] = time.perf_counter() - t0
        result["vision"] = vis["summary"]
        result["vision_details"] = vis
    if s.vision_sweep:
        from curvfast.demo_vision import VisionSettings, format_vision_sweep, sweep_vision

        t0 = time.perf_counter()
        sw = sweep_vision(VisionSettings(cache_dir=s.cache_dir, retrain=s.retrain and not s.vision,
                                         progress=s.progress, seed=s.seed), log=log)
        timings["vision_sweep_s"] = time.perf_counter() - t0
        print("\nViT arm, layer subsets × rho (one factor collection; each point edited and undone):\n")
        print(format_vision_sweep(sw))
        result["vision_sweep"] = sw
    timings["total_s"] = time.perf_counter() - t_start
    if s.json:
        Path(s.json).expanduser().write_text(json.dumps(result, indent=1))
        log(f"wrote {s.json}")
    return result
