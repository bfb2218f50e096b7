"""Local data: text → token ids → fixed-length packed batches, and memorized-sequence sets.

Inputs are local files only (no downloads):

- ``.txt`` / ``.text`` / ``.md``: one document per file.
- ``.jsonl`` / ``.ndjson``: one JSON object per line with ``"text"`` (a string, tokenized) or
  ``"input_ids"`` (a list of ints, used as given).
- A directory stands for its supported files, sorted by name (not recursive).

Documents are joined with the tokenizer's EOS token (when it has one), packed into rows of
``seq_len`` tokens and served as batches ``{"input_ids": (B, L) int64,
"attention_mask": (B, L) int64}`` — the shape :func:`curvfast.collect_factors` and
:func:`curvfast.evaluate.perplexity` take.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch

__all__ = [
    "TEXT_SUFFIXES", "JSONL_SUFFIXES", "read_documents", "tokenize_documents", "pack",
    "Batches", "text_batches", "load_memorized",
]

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PathLike = Union[str, os.PathLike]
Paths = Union[PathLike, Sequence[PathLike]]


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
def _expand(paths: Paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"data file not found: {str(p)!r}")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file()
                           and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not files:
                raise ValueError(f"directory {str(p)!r} holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
            out.extend(files)
        else:
            if p.suffix.lower() not in TEXT_SUFFIXES + JSONL_SUFFIXES:
                raise ValueError(f"{str(p)!r}: unsupported file type {p.suffix!r}; "
                                 f"use one of {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}")
            out.append(p)
    if not out:
        raise ValueError("no data files given")
    return out


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def _int_list(x: Any, where: str) -> list[int]:
    if not isinstance(x, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
        raise ValueError(f"{where}: expected a list of integer token ids")
    return x


def read_documents(paths: Paths, text_field: str = "text") -> Iterator[Union[str, list[int]]]:
    """Yield documents: strings (text) or lists of token ids (jsonl ``input_ids``).

    Raises FileNotFoundError naming a missing file, ValueError for malformed records.
    """
    for path in _expand(paths):
        if path.suffix.lower() in TEXT_SUFFIXES:
            yield path.read_text(encoding="utf-8")
            continue
        for lineno, rec in _jsonl_records(path):
            if text_field in rec:
                if not isinstance(rec[text_field], str):
                    raise ValueError(f"{path}:{lineno}: field {text_field!r} must be a string")
                yield rec[text_field]
            elif "input_ids" in rec:
                yield _int_list(rec["input_ids"], f"{path}:{lineno}: field 'input_ids'")
            else:
                raise ValueError(f"{path}:{lineno}: record has neither {text_field!r} nor 'input_ids' "
                                 f"(keys: {sorted(rec)})")


# --------------------------------------------------------------------------------------
# Tokenizing and packing
# --------------------------------------------------------------------------------------
def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (HF tokenizers or raw `tokenizers`)."""
    if tokenizer is None:
        raise ValueError("text documents need a tokenizer (only jsonl 'input_ids' records work without one)")
    if hasattr(tokenizer, "backend_tokenizer") and getattr(tokenizer, "is_fast", False):
        # the fast path skips the "sequence longer than model max length" warning for long files
        return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    if callable(tokenizer) and not hasattr(tokenizer, "encode_batch"):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return tokenizer.encode(text, add_special_tokens=False).ids  # tokenizers.Tokenizer


def _eos_id(tokenizer: Any) -> Optional[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else None


def tokenize_documents(
    documents: Iterable[Union[str, Sequence[int]]],
    tokenizer: Any = None,
    max_tokens: Optional[int] = None,
    add_eos: bool = True,
) -> torch.Tensor:
    """Concatenate documents into one 1-D int64 stream, EOS after each when the tokenizer has one.

    Stops reading as soon as ``max_tokens`` tokens are collected (the result is cut to it).
    Raises ValueError when nothing is left.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be ≥ 1, got {max_tokens}")
    eos = _eos_id(tokenizer) if add_eos else None
    chunks: list[list[int]] = []
    n = 0
    for doc in documents:
        ids = _encode(tokenizer, doc) if isinstance(doc, str) else [int(t) for t in doc]
        if not ids:
            continue
        if eos is not None:
            ids = ids + [eos]
        chunks.append(ids)
        n += len(ids)
        if max_tokens is not None and n >= max_tokens:
            break
    if n == 0:
        raise ValueError("no tokens: the data is empty")
    stream = torch.tensor([t for c in chunks for t in c], dtype=torch.long)
    return stream[:max_tokens] if max_tokens is not None else stream


def pack(ids: torch.Tensor, seq_len: int, drop_last: bool = True, pad_id: int = 0) -> dict:
    """Cut a 1-D stream into rows of ``seq_len``: ``{"input_ids", "attention_mask"}``, (N, seq_len).

    ``drop_last=False`` keeps a final short row, right-padded with ``pad_id`` and masked out.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be ≥ 2 (one input and one target), got {seq_len}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n_full = ids.numel() // seq_len
    rest = ids.numel() - n_full * seq_len
    rows = ids[:n_full * seq_len].view(n_full, seq_len)
    mask = torch.ones_like(rows)
    if rest and not drop_last:
        tail = torch.full((1, seq_len), pad_id, dtype=torch.long)
        tail[0, :rest] = ids[n_full * seq_len:]
        tmask = torch.zeros((1, seq_len), dtype=torch.long)
        tmask[0, :rest] = 1
        rows, mask = torch.cat([rows, tail]), torch.cat([mask, tmask])
    if rows.shape[0] == 0:
        raise ValueError(f"not enough tokens ({ids.numel()}) for one sequence of seq_len={seq_len}; "
                         f"pass more data, a smaller seq_len, or drop_last=False")
    return {"input_ids": rows, "attention_mask": mask}


class Batches:
    """Re-iterable batches over packed rows (iterating twice gives the same batches).

    Yields ``{"input_ids": (B, L) int64, "attention_mask": (B, L) int64}``; ``len()`` is the
    number of batches; ``.tokens`` the number of unmasked tokens.
    """

    def __init__(self, packed: dict, batch_size: int = 8, shuffle: bool = False, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.input_ids = packed["input_ids"]
        self.attention_mask = packed.get("attention_mask")
        if self.attention_mask is None:
            self.attention_mask = torch.ones_like(self.input_ids)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def __len__(self) -> int:
        return -(-self.input_ids.shape[0] // self.batch_size)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def __iter__(self) -> Iterator[dict]:
        n = self.input_ids.shape[0]
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
                 if self.shuffle else torch.arange(n))
        for k in range(0, n, self.batch_size):
            idx = order[k:k + self.batch_size]
            yield {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx]}

    def __repr__(self) -> str:
        return (f"Batches(rows={self.input_ids.shape[0]}, seq_len={self.input_ids.shape[1]}, "
                f"batch_size={self.batch_size}, batches={len(self)}, tokens={self.tokens})")


def text_batches(
    paths: Paths,
    tokenizer: Any = None,
    seq_len: int = 512,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = True,
    text_field: str = "text",
) -> Batches:
    """Files → packed, re-iterable batches of ``seq_len`` tokens (at most ``max_tokens`` read)."""
    stream = tokenize_documents(read_documents(paths, text_field), tokenizer, max_tokens=max_tokens)
    pad = getattr(tokenizer, "pad_token_id", None)
    return Batches(pack(stream, seq_len, drop_last=drop_last, pad_id=0 if pad is None else int(pad)),
                   batch_size=batch_size, shuffle=shuffle, seed=seed)


# --------------------------------------------------------------------------------------
# Memorized-sequence sets (for curvfast.evaluate.recitation)
# --------------------------------------------------------------------------------------
def load_memorized(
    path: PathLike,
    tokenizer: Any = None,
    max_sequences: Optional[int] = None,
) -> list[Union[list[int], tuple[list[int], list[int]]]]:
    """Read a jsonl of memorized sequences, one per line, as recitation inputs.

    Each record has ``"input_ids"`` (ids; split later by prefix_len/suffix_len), or
    ``"text"`` (tokenized whole), or ``"prefix"`` and ``"suffix"`` (each a string or a list
    of ids) → a ``(prefix, suffix)`` pair used as given. Strings are tokenized without
    special tokens; a prefix and suffix are tokenized separately, so the split point is
    exactly the text boundary.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"memorized-sequence file not found: {str(path)!r}")
    if path.is_dir() or path.suffix.lower() not in JSONL_SUFFIXES:
        raise ValueError(f"{str(path)!r}: memorized sequences must be a .jsonl file")

    def ids_of(x: Any, where: str) -> list[int]:
        if isinstance(x, str):
            return _encode(tokenizer, x)
        return list(_int_list(x, where))

    out: list = []
    for lineno, rec in _jsonl_records(path):
        where = f"{path}:{lineno}"
        if "prefix" in rec or "suffix" in rec:
            if "prefix" not in rec or "suffix" not in rec:
                raise ValueError(f"{where}: a record with 'prefix' needs 'suffix' too, and vice versa")
            p, s = ids_of(rec["prefix"], f"{where}: field 'prefix'"), ids_of(rec["suffix"], f"{where}: field 'suffix'")
            if not p or not s:
                raise ValueError(f"{where}: empty prefix or suffix")
            out.append((p, s))
        elif "input_ids" in rec:
            out.append(list(_int_list(rec["input_ids"], f"{where}: field 'input_ids'")))
        elif "text" in rec:
            if not isinstance(rec["text"], str):
                raise ValueError(f"{where}: field 'text' must be a string")
            out.append(_encode(tokenizer, rec["text"]))
        else:
            raise ValueError(f"{where}: record needs 'input_ids', 'text', or 'prefix' and 'suffix' "
                             f"(keys: {sorted(rec)})")
        if max_sequences is not None and len(out) >= max_sequences:
            break
    if not out:
        raise ValueError(f"{str(path)!r} holds no memorized sequences")
    return out
