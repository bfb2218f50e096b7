"""Factors and eigenbases on disk: safetensors with metadata, written atomically.

Layout (format version 1):
- factors: tensors ``A/<a_key>`` (once per shared input) and ``G/<module>``;
- eigen:   tensors ``A/<a_key>/evals``, ``A/<a_key>/evecs``, ``G/<module>/evals``, ``G/<module>/evecs``;
- metadata (all strings): ``curvfast.format`` ("factors" | "eigen"), ``curvfast.format_version``,
  ``curvfast.meta`` (JSON: fisher, convention, tokens, model identity, versions, ...),
  ``curvfast.modules`` (JSON: module → a_key, d_out, d_in, tokens, clamped counts).
Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from curvfast import __version__
from curvfast.collect import Factors, FactorSet
from curvfast.eigen import Eigenbasis, EigenSet, Spectrum
from curvfast.modules import dims
from curvfast.packed import pack_lower, unpack_lower

FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]

# Config fields that define the architecture (others, like paths or dtypes, do not).
_ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "n_embd", "n_layer", "n_head", "n_inner",
              "image_size", "patch_size", "num_channels", "num_labels", "max_position_embeddings", "n_positions")


class StoreError(ValueError):
    """A file is not a readable curvfast file of the expected kind, or does not fit the model."""


def config_identity(cfg: Any, fallback: str = "") -> dict[str, Any]:
    """Identity from a transformers config: type, name and a fingerprint of the architecture
    (the fields that fix shapes; paths, dtypes and class names do not count)."""
    arch: dict[str, Any] = {}
    if cfg is not None:
        for key in _ARCH_KEYS:
            val = getattr(cfg, key, None)
            if isinstance(val, (int, float, str)):
                arch[key] = val
    if not arch:
        arch = {"class": fallback}
    fp = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "model_type": getattr(cfg, "model_type", None) or fallback,
        "model_name": getattr(cfg, "_name_or_path", "") or "",
        "model_fingerprint": fp,
    }


def model_identity(model: nn.Module, names: list[str] | None = None) -> dict[str, Any]:
    """Identity of a model: type, name and a fingerprint of its architecture."""
    return config_identity(getattr(model, "config", None), type(model).__name__)


def check_model(meta: dict[str, Any], modules: dict[str, dict], model: nn.Module, path: PathLike = "") -> None:
    """Raise StoreError if factors/eigenbases with this metadata were not made for ``model``."""
    ident = model_identity(model)
    if meta.get("model_fingerprint") and meta["model_fingerprint"] != ident["model_fingerprint"]:
        raise StoreError(f"{path}: made for a different model ({meta.get('model_type')} "
                         f"{meta.get('model_name')!r}, fingerprint {meta['model_fingerprint']}) than this one "
                         f"({ident['model_type']} {ident['model_name']!r}, fingerprint {ident['model_fingerprint']})")
    named = dict(model.named_modules())
    for name, info in modules.items():
        if name not in named:
            raise StoreError(f"{path}: module {name!r} does not exist in this model")
        if list(dims(named[name])) != [info["d_out"], info["d_in"]]:
            raise StoreError(f"{path}: module {name!r} has shape {list(dims(named[name]))} in this model but "
                             f"{[info['d_out'], info['d_in']]} in the file")


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: PathLike) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        out, seen = {}, set()
        for k, v in tensors.items():
            v = v.detach().contiguous().cpu()
            if v.numel() and v.untyped_storage().data_ptr() in seen:
                v = v.clone()  # safetensors refuses aliased tensors
            seen.add(v.untyped_storage().data_ptr())
            out[k] = v
        save_file(out, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _read_header(path: PathLike, kind: str) -> tuple[dict[str, Any], dict[str, dict]]:
    """(meta, modules) of a curvfast file, checked, without reading its tensors."""
    return _open(path, kind, tensors=False)[1:]


def _read(path: PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, dict]]:
    return _open(path, kind, tensors=True)


def _open(path: PathLike, kind: str, tensors: bool):
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("curvfast.format") is None:
                raise StoreError(f"{path}: not a curvfast file (no curvfast metadata)")
            if md["curvfast.format"] != kind:
                raise StoreError(f"{path}: holds curvfast {md['curvfast.format']}, expected {kind}")
            version = int(md.get("curvfast.format_version", "0"))
            if version > FORMAT_VERSION:
                raise StoreError(f"{path}: format version {version} is newer than this curvfast "
                                 f"({__version__}, format {FORMAT_VERSION}); upgrade curvfast")
            meta = json.loads(md["curvfast.meta"])
            modules = json.loads(md["curvfast.modules"])
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except StoreError:
        raise
    except Exception as e:  # safetensors reports truncation and garbage with its own errors
        raise StoreError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return data, meta, modules


def _metadata(kind: str, meta: dict[str, Any], modules: dict[str, dict]) -> dict[str, str]:
    return {
        "curvfast.format": kind,
        "curvfast.format_version": str(FORMAT_VERSION),
        "curvfast.version": __version__,
        "curvfast.meta": json.dumps(meta, default=str),
        "curvfast.modules": json.dumps(modules),
    }


def save_factors(factors: FactorSet, path: PathLike, packed: bool = True) -> Path:
    """Write a FactorSet atomically (temporary file + rename). ``packed`` stores only the lower
    triangle of each symmetric factor (half the file size)."""
    store = pack_lower if packed else (lambda M: M)
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, f in factors.items():
        if f"A/{f.a_key}" not in tensors:
            tensors[f"A/{f.a_key}"] = store(f.A)
        tensors[f"G/{name}"] = store(f.G)
        modules[name] = {"a_key": f.a_key, "d_out": f.d_out, "d_in": f.d_in, "tokens": f.tokens, "packed": packed,
                         "dtype": str(f.G.dtype).replace("torch.", "")}
    return _atomic_save(tensors, _metadata("factors", factors.meta, modules), path)


def _is_index(path: PathLike) -> bool:
    return str(path).endswith(".index.json") or (Path(path) / "factors.index.json").exists() \
        or (Path(path) / "eigen.index.json").exists()


def _index_path(path: PathLike, kind: str) -> Path:
    p = Path(path)
    return p / f"{kind}.index.json" if p.is_dir() else p


def load_factors(path: PathLike, model: nn.Module | None = None) -> FactorSet:
    """Read factors written by :func:`save_factors` (or the index of a distributed job); with
    ``model``, check they belong to it."""
    if _is_index(path):
        from curvfast.distributed import load_index

        return load_index(_index_path(path, "factors"), "factors", model)
    tensors, meta, modules = _read(path, "factors")
    if model is not None:
        check_model(meta, modules, model, path)
    out = {}
    shared: dict[str, torch.Tensor] = {}
    for name, info in modules.items():
        try:
            A, G = tensors[f"A/{info['a_key']}"], tensors[f"G/{name}"]
        except KeyError as e:
            raise StoreError(f"{path}: tensor {e} is missing") from None
        if info.get("packed"):
            try:
                if info["a_key"] not in shared:
                    shared[info["a_key"]] = unpack_lower(A, info["d_in"])
                A, G = shared[info["a_key"]], unpack_lower(G, info["d_out"])
            except ValueError as e:
                raise StoreError(f"{path}: {name}: {e}") from None
        if A.shape != (info["d_in"], info["d_in"]) or G.shape != (info["d_out"], info["d_out"]):
            raise StoreError(f"{path}: factor shapes of {name} do not match its metadata")
        out[name] = Factors(A=A, G=G, tokens=info["tokens"], a_key=info["a_key"])
    # Shared A: one tensor object per key, as collect_factors returns it.
    return FactorSet(out, meta)


def save_eigen(eigen: EigenSet, path: PathLike) -> Path:
    """Write an EigenSet atomically."""
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, e in eigen.items():
        tensors.setdefault(f"A/{e.a_key}/evals", e.A.evals)
        tensors.setdefault(f"A/{e.a_key}/evecs", e.A.evecs)
        tensors[f"G/{name}/evals"] = e.G.evals
        tensors[f"G/{name}/evecs"] = e.G.evecs
        modules[name] = {"a_key": e.a_key, "d_out": e.G.evals.shape[0], "d_in": e.A.evals.shape[0],
                         "tokens": e.tokens, "clamped_A": e.A.clamped, "clamped_G": e.G.clamped,
                         "dtype": str(e.G.evecs.dtype).replace("torch.", "")}
    return _atomic_save(tensors, _metadata("eigen", eigen.meta, modules), path)


def load_eigen(path: PathLike, model: nn.Module | None = None) -> EigenSet:
    """Read eigenbases written by :func:`save_eigen` (or a distributed job's index); with
    ``model``, check they belong to it."""
    if _is_index(path):
        from curvfast.distributed import load_index

        return load_index(_index_path(path, "eigen"), "eigen", model)
    tensors, meta, modules = _read(path, "eigen")
    if model is not None:
        check_model(meta, modules, model, path)
    spectra: dict[str, Spectrum] = {}
    bases = {}
    for name, info in modules.items():
        try:
            key = info["a_key"]
            if key not in spectra:
                spectra[key] = Spectrum(tensors[f"A/{key}/evals"], tensors[f"A/{key}/evecs"], info.get("clamped_A", 0))
            G = Spectrum(tensors[f"G/{name}/evals"], tensors[f"G/{name}/evecs"], info.get("clamped_G", 0))
        except KeyError as e:
            raise StoreError(f"{path}: tensor {e} is missing") from None
        if spectra[key].evecs.shape != (info["d_in"], info["d_in"]) or G.evecs.shape != (info["d_out"], info["d_out"]):
            raise StoreError(f"{path}: eigenbasis shapes of {name} do not match its metadata")
        bases[name] = Eigenbasis(A=spectra[key], G=G, a_key=key, tokens=info["tokens"])
    return EigenSet(bases, meta)
