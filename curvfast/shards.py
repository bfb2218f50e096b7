"""Edit a Hugging Face checkpoint on disk, shard by shard, without loading the model.

Peak memory is about one shard plus one module's eigenbases (read lazily from the eigen file)
plus fp32 temporaries of one weight. Shards without a target tensor are copied byte for byte;
edited shards keep their names, tensor order and metadata, so the index stays valid. The output
directory is written under a temporary name and moved into place when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from curvfast.edit import edit_report, edit_weight
from curvfast.eigen import Eigenbasis, Spectrum
from curvfast.keepset import keep_counts
from curvfast.store import StoreError, _read_header, config_identity

PathLike = Union[str, os.PathLike]
INDEX = "model.safetensors.index.json"
# Families whose linear layers store weights as (d_in, d_out) (transformers' Conv1D).
TRANSPOSED_TYPES = ("gpt2",)


class LazyEigen(Mapping):
    """Eigenbases read from an eigen file one module at a time (shared A cached once)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.meta, self.modules = _read_header(self.path, "eigen")
        self._a_cache: tuple[str, Spectrum] | None = None

    def __getitem__(self, name: str) -> Eigenbasis:
        info = self.modules[name]
        key = info["a_key"]
        f = SafetensorsReader(self.path)
        if self._a_cache is None or self._a_cache[0] != key:
            self._a_cache = None  # drop the previous A before reading the next
            self._a_cache = (key, Spectrum(f.get(f"A/{key}/evals"), f.get(f"A/{key}/evecs"), info.get("clamped_A", 0)))
        G = Spectrum(f.get(f"G/{name}/evals"), f.get(f"G/{name}/evecs"), info.get("clamped_G", 0))
        return Eigenbasis(A=self._a_cache[1], G=G, a_key=key, tokens=info["tokens"])

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory into place; an old one is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _weight_map(src: Path) -> dict[str, str]:
    index = src / INDEX
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = src / "model.safetensors"
    if not single.is_file():
        raise StoreError(f"{src}: no {INDEX} and no model.safetensors (curvfast reads safetensors checkpoints only)")
    return {k: "model.safetensors" for k in SafetensorsReader(single).keys()}


def checkpoint_targets(src: PathLike, eigen: Mapping, modules: Optional[list[str]] = None) -> dict[str, str]:
    """Map module name → checkpoint tensor name for the weights to edit; raises KeyError if a
    module's weight is not stored under its module name (the caller may then load the model)."""
    wmap = _weight_map(Path(src))
    names = list(eigen) if modules is None else list(modules)
    missing = [n for n in names if f"{n}.weight" not in wmap]
    if missing:
        raise KeyError(f"weights of {missing[:3]} are not stored under their module names in {src}")
    return {n: f"{n}.weight" for n in names}


def edit_checkpoint(src: PathLike, eigen: Union[PathLike, Mapping], out: PathLike,
                    rho: Union[float, Mapping[str, float]] = 0.6, modules: Optional[list[str]] = None,
                    overwrite: bool = False, progress: bool = True, device: Optional[torch.device] = None) -> dict:
    """Stream-edit the safetensors checkpoint in ``src`` into ``out``; returns the report.

    eigen: an eigen file (read lazily) or an EigenSet. rho: fraction, or dict per module.
    """
    from transformers import AutoConfig

    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: not a Hugging Face model directory (no config.json)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if out.resolve() == src.resolve():
        raise ValueError("the output directory must differ from the input")
    eig = LazyEigen(eigen) if isinstance(eigen, (str, os.PathLike)) else eigen
    cfg = AutoConfig.from_pretrained(str(src), local_files_only=True)
    ident = config_identity(cfg)
    meta = getattr(eig, "meta", {}) or {}
    if meta.get("model_fingerprint") and meta["model_fingerprint"] != ident["model_fingerprint"]:
        raise StoreError(f"eigenbases were made for a different model ({meta.get('model_type')} "
                         f"{meta.get('model_name')!r}) than {src} ({ident['model_type']})")
    names = list(eig) if modules is None else list(modules)
    rhos = {n: float(rho[n] if isinstance(rho, Mapping) else rho) for n in names}
    for n, r in rhos.items():
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"rho for {n} must be in [0, 1], got {r}")
    targets = checkpoint_targets(src, eig, names)
    wmap = _weight_map(src)
    by_shard: dict[str, list[str]] = {}
    for n, key in targets.items():
        by_shard.setdefault(wmap[key], []).append(n)
    transposed = cfg.model_type in TRANSPOSED_TYPES

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    reports: dict[str, dict] = {}
    bar = None
    shards = sorted(set(wmap.values()))
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(shards), desc="edit shards", unit="shard", dynamic_ncols=True)
    try:
        for shard in shards:
            if shard not in by_shard:
                shutil.copyfile(src / shard, tmp / shard)
            else:
                edits = {targets[n]: n for n in by_shard[shard]}

                def transform(key: str, t: torch.Tensor) -> torch.Tensor:
                    n = edits.get(key)
                    if n is None:
                        return t
                    new, reports[n] = _edit_tensor(t, eig[n], rhos[n], transposed, n, device)
                    return new

                rewrite_safetensors(src / shard, tmp / shard, transform)
            if bar is not None:
                bar.update(1)
        for f in src.iterdir():  # config, tokenizer, index and other side files
            if f.is_file() and f.name not in shards:
                shutil.copy2(f, tmp / f.name)
        report = {"source": str(src.resolve()), "rho": rho if not isinstance(rho, Mapping) else dict(rho),
                  "meta": meta, "modules": reports, "mode": "streamed shard by shard"}
        (tmp / "edit_report.json").write_text(json.dumps(report, indent=2, default=str))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return report


def _edit_tensor(stored: torch.Tensor, e: Eigenbasis, rho: float, transposed: bool, name: str,
                 device: Optional[torch.device]) -> tuple[torch.Tensor, dict[str, Any]]:
    W = stored.t() if transposed else stored
    d_out, d_in = e.evals_G.shape[0], e.evals_A.shape[0]
    if tuple(W.shape) != (d_out, d_in):
        raise StoreError(f"{name}: checkpoint weight has shape {tuple(stored.shape)}, eigenbases need "
                         f"({d_out}, {d_in}){' transposed' if transposed else ''}")
    dev = device or torch.device("cpu")
    k = keep_counts(e.evals_G, e.evals_A, rho)
    new = edit_weight(W.to(dev), e.evals_G.to(dev), e.evecs_G.to(dev), e.evals_A.to(dev), e.evecs_A.to(dev), rho, k=k)
    new = new.cpu()
    report = edit_report(W, new, e.evals_G, e.evals_A, k, rho)
    return (new.t() if transposed else new).contiguous(), report


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
           "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}


class SafetensorsReader:
    """Reads tensors of a safetensors file with plain reads, one at a time.

    safetensors' own reader maps the whole file, and every page it touches counts towards the
    process's resident memory; streaming a multi-GB checkpoint must not.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise StoreError(f"{self.path}: not a safetensors file (too short)")
            n = int.from_bytes(raw, "little")
            if n > 100 * 2**20:
                raise StoreError(f"{self.path}: not a safetensors file (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise StoreError(f"{self.path}: not a safetensors file ({e})") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None)
        self.entries = header
        for k, e in header.items():
            if e.get("dtype") not in _DTYPES:
                raise StoreError(f"{self.path}: tensor {k} has dtype {e.get('dtype')}, which curvfast cannot read")

    def keys(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])

    def get(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        start, end = e["data_offsets"]
        t = torch.empty(e["shape"], dtype=_DTYPES[e["dtype"]])
        buf = t.view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        if buf.numel() != end - start:
            raise StoreError(f"{self.path}: tensor {key} spans {end - start} bytes, its shape needs {buf.numel()}")
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            if f.readinto(memoryview(buf.numpy())) != end - start:
                raise StoreError(f"{self.path}: truncated in tensor {key}")
        return t


def rewrite_safetensors(src: Path, dst: Path, transform) -> None:
    """Copy a safetensors file tensor by tensor, passing each through ``transform(name, t)``,
    which must keep its dtype and shape. Only one tensor is in memory at a time (the
    library's save_file would hold the whole shard twice, and its reader maps it all)."""
    reader = SafetensorsReader(src)
    keys = reader.keys()
    header: dict[str, Any] = {}
    if reader.metadata:
        header["__metadata__"] = reader.metadata
    offset = 0
    for k in keys:
        e = reader.entries[k]
        size = e["data_offsets"][1] - e["data_offsets"][0]
        header[k] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(dst, "wb") as out:
        out.write(len(blob).to_bytes(8, "little"))
        out.write(blob)
        for k in keys:
            t = reader.get(k)
            new = transform(k, t)
            if new.dtype != t.dtype or new.shape != t.shape:
                raise StoreError(f"rewriting {k}: dtype/shape changed from {t.dtype}{tuple(t.shape)} "
                                 f"to {new.dtype}{tuple(new.shape)}")
            data = new.contiguous().view(-1).view(torch.uint8) if new.numel() else torch.empty(0, dtype=torch.uint8)
            out.write(memoryview(data.numpy()))
            if out.tell() - 8 - len(blob) != header[k]["data_offsets"][1]:
                raise StoreError(f"rewriting {k}: wrote an unexpected number of bytes")
            del t, new, data
        out.flush()
        os.fsync(out.fileno())
