"""``curvfast demo --vision``: the ViT arm of the paper (SPEC §3, §4) at laptop scale, offline.

1. sklearn's 8×8 digits (1797 images, bundled with scikit-learn, nothing downloaded), split
   into train / validation; 10% of the training labels replaced by a random *other* class.
2. A small transformers ViT trained on the noisy labels until it fits them (memorizes the
   noise). Model and split are cached under ``--cache-dir``, keyed by the settings.
3. K-FAC factors from the CLS token with sampled labels (true Fisher) on the training images;
   eigendecomposition; edit fc1/fc2 of the first and last blocks at ρ = 0.75.
4. Memorized % (noisy-label images still predicted with the noisy label), accuracy against
   the true label on them, validation accuracy: original vs K-FAC edit vs SVD truncation of
   the same matrices at the same ρ (singular-value energy).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["VisionSettings", "load_digits_split", "run_vision", "format_vision", "sweep_vision"]

VISION_VERSION = 1


@dataclass
class VisionSettings:
    """Everything that decides the vision arm's result; TRAIN_FIELDS key the cache."""

    noise: float = 0.10
    val_frac: float = 0.2
    hidden_size: int = 64
    num_layers: int = 4
    intermediate_size: int = 256
    num_heads: int = 4
    patch_size: int = 4
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    seed: int = 0
    # edit
    rho: float = 0.75
    layers: str = "first,last"
    factor_batch_size: int = 128
    # run
    cache_dir: str = "~/.cache/curvfast/demo"
    retrain: bool = False
    progress: bool = True

    TRAIN_FIELDS = ("noise", "val_frac", "hidden_size", "num_layers", "intermediate_size", "num_heads",
                    "patch_size", "epochs", "batch_size", "lr", "warmup", "seed")

    def cache_key(self) -> str:
        d = {k: getattr(self, k) for k in self.TRAIN_FIELDS}
        d["version"] = VISION_VERSION
        return "vision-" + hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_digits_split(noise: float, val_frac: float, seed: int) -> dict[str, torch.Tensor]:
    """sklearn digits → {train_x (N,1,8,8) float32 in [0,1], train_true, train_noisy, val_x, val_y}.

    Exactly round(noise · N) training labels are replaced by a uniformly drawn *different* class,
    so every noisy label is wrong.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the vision demo reads sklearn's bundled digits: pip install scikit-learn") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_val = int(round(val_frac * len(y)))
    val, tr = perm[:n_val], perm[n_val:]
    true = y[tr]
    noisy = true.clone()
    n_noisy = int(round(noise * len(tr)))
    which = torch.randperm(len(tr), generator=g)[:n_noisy]
    shift = torch.randint(1, 10, (n_noisy,), generator=g)       # 1..9: never the true class
    noisy[which] = (true[which] + shift) % 10
    return {"train_x": x[tr], "train_true": true, "train_noisy": noisy, "val_x": x[val], "val_y": y[val]}


def build_vit(s: VisionSettings):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=s.patch_size, num_channels=1, hidden_size=s.hidden_size,
                    intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                    num_attention_heads=s.num_heads, num_labels=10, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    torch.manual_seed(s.seed)
    return ViTForImageClassification(cfg)


def train_vit(model, x: torch.Tensor, y: torch.Tensor, s: VisionSettings) -> list[float]:
    """AdamW with warmup and cosine decay, shuffled mini-batches; returns per-epoch mean losses."""
    from tqdm.auto import tqdm

    steps_per_epoch = math.ceil(len(y) / s.batch_size)
    total = s.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / s.warmup if k < s.warmup else 0.5 * (1 + math.cos(math.pi * (k - s.warmup) / max(1, total - s.warmup))))
    g = torch.Generator().manual_seed(s.seed + 1)
    model.train()
    losses = []
    bar = tqdm(range(s.epochs), desc="train ViT", disable=not s.progress, dynamic_ncols=True)
    for _ in bar:
        perm = torch.randperm(len(y), generator=g)
        tot = 0.0
        for k in range(0, len(y), s.batch_size):
            idx = perm[k:k + s.batch_size]
            loss = model(pixel_values=x[idx], labels=y[idx]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            tot += float(loss.detach()) * len(idx)
        losses.append(tot / len(y))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def _prepare(s: VisionSettings, log: Callable[..., None]):
    from safetensors.torch import load_file, save_file
    from transformers import ViTForImageClassification

    data = load_digits_split(s.noise, s.val_frac, s.seed)
    path = Path(s.cache_dir).expanduser() / s.cache_key()
    if path.exists() and not s.retrain:
        try:
            model = ViTForImageClassification.from_pretrained(path / "model").eval()
            meta = json.loads((path / "meta.json").read_text())
            cached = load_file(str(path / "labels.safetensors"))
            if torch.equal(cached["train_noisy"], data["train_noisy"]):
                log(f"loaded cached ViT {path}")
                meta["cached"] = True
                return model, data, meta
            log(f"cache at {path} has another split; training again")
        except Exception as e:  # a damaged cache is rebuilt, not fatal
            log(f"cache at {path} unreadable ({type(e).__name__}: {e}); training again")
    model = build_vit(s)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"training a {n_params / 1e3:.0f}k-parameter ViT ({s.num_layers} blocks, hidden {s.hidden_size}, patch "
        f"{s.patch_size}) on {len(data['train_true'])} digits, {int((data['train_noisy'] != data['train_true']).sum())} "
        f"with random wrong labels, for {s.epochs} epochs")
    t0 = time.perf_counter()
    losses = train_vit(model, data["train_x"], data["train_noisy"], s)
    meta = {"params": n_params, "train_s": time.perf_counter() - t0, "final_loss": losses[-1],
            "settings": {k: getattr(s, k) for k in s.TRAIN_FIELDS}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp / "model")
        save_file({"train_noisy": data["train_noisy"].contiguous()}, str(tmp / "labels.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"cached at {path}")
    meta["cached"] = False
    return model, data, meta


def _layers(spec: str, n: int) -> list[int]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        out.append(0 if part == "first" else n - 1 if part == "last" else int(part) % n)
    return sorted(set(out))


def _measure(model, data: dict) -> dict:
    """Noisy-label metrics of ``model`` on the split (fractions in [0, 1])."""
    from curvfast.evaluate import noisy_label_metrics

    m = noisy_label_metrics(model, data["train_x"], data["train_noisy"], data["train_true"], data["val_x"],
                            data["val_y"])
    return {k: m[k] for k in ("memorized", "true_label_acc", "val_acc", "clean_train_acc")}


def _factor_batches(data: dict, batch_size: int) -> list[dict]:
    """Training images with their (noisy) training labels, for the factors (labels are sampled)."""
    return [{"pixel_values": data["train_x"][k:k + batch_size], "labels": data["train_noisy"][k:k + batch_size]}
            for k in range(0, len(data["train_true"]), batch_size)]


def format_vision(rows: list[dict]) -> str:
    head = f"{'model':<28} {'memorized':>9} {'true-label acc':>14} {'val acc':>8} {'|ΔW|/|W|':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<28} {r['memorized']:>9.1%} {r['true_label_acc']:>14.1%} {r['val_acc']:>8.1%} "
                     f"{r.get('rel_change', 0.0):>9.3f}")
    return "\n".join(lines)


def run_vision(s: Optional[VisionSettings] = None, log: Optional[Callable[..., None]] = None, **overrides: Any) -> dict:
    """Run the ViT arm; print its table; return every number (fractions in [0, 1])."""
    import curvfast
    from curvfast.baselines import svd_model

    s = s or VisionSettings()
    for k, v in overrides.items():
        if not hasattr(s, k):
            raise TypeError(f"unknown vision setting {k!r}")
        setattr(s, k, v)
    log = log or (lambda *a: print(*a, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    model, data, meta = _prepare(s, log)

    def measure() -> dict:
        return _measure(model, data)

    rows = [dict(name="original", method="none", **measure(), rel_change=0.0)]
    layers = _layers(s.layers, s.num_layers)
    batches = _factor_batches(data, s.factor_batch_size)
    t0 = time.perf_counter()
    factors = curvfast.collect_factors(model, batches, modules="mlp", layers=layers, fisher="true", seed=s.seed,
                                       progress=s.progress)
    eigen = curvfast.eigendecompose(factors, progress=False)
    factor_s = time.perf_counter() - t0
    names = list(eigen)
    res = curvfast.edit_model(model, eigen, rho=s.rho)
    try:
        rows.append(dict(name=f"K-FAC edit, rho={s.rho:g}", method="kfac", rho=s.rho, **measure(),
                         rel_change=sum(r["rel_change"] for r in res.reports.values()) / len(res.reports)))
    finally:
        res.undo()
    res = svd_model(model, names, rho=s.rho)
    try:
        rows.append(dict(name=f"SVD truncation, rho={s.rho:g}", method="svd", rho=s.rho, **measure(),
                         rel_change=sum(r["rel_change"] for r in res.reports.values()) / len(res.reports)))
    finally:
        res.undo()
    total = time.perf_counter() - t_start
    print(f"\ncurvfast demo --vision — {meta['params'] / 1e3:.0f}k-parameter ViT on sklearn digits, "
          f"{s.noise:.0%} of training labels randomized; edited fc1/fc2 of blocks {layers} ({len(names)} matrices); "
          f"factors from the CLS token, sampled labels\n")
    print(format_vision(rows))
    print(f"\nmemorized: noisy-label training images predicted with their noisy label; true-label acc: the same "
          f"images predicted with their true label.\n{'cached model' if meta['cached'] else 'trained now'}; "
          f"total {total:.0f} s.")
    return {"settings": {k: v for k, v in asdict(s).items()}, "model": meta, "edited_modules": names,
            "rows": rows, "timings": {"factors_eigen_s": factor_s, "total_s": total},
            "summary": {r["method"] if r["method"] != "none" else "baseline":
                        {k: r[k] for k in ("memorized", "true_label_acc", "val_acc")} for r in rows}}


#: the layer subsets of the vision sweep (``_layers`` syntax) and its ρ grid (SPEC §3: 0.6–0.9, plus ends)
SWEEP_LAYERS = ("first,last", "first", "last", "all")
SWEEP_RHO = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95)


def _layer_set(spec: str, n: int) -> list[int]:
    return list(range(n)) if spec.strip() == "all" else _layers(spec, n)


def best_vision_point(points: list[dict], base: dict, max_val_drop: float = 0.02) -> Optional[dict]:
    """The sweep point with the lowest memorized fraction among those whose validation accuracy
    is at most ``max_val_drop`` below the original's (ties → higher validation accuracy); None if
    no point qualifies."""
    ok = [p for p in points if p["val_acc"] >= base["val_acc"] - max_val_drop - 1e-12]
    return min(ok, key=lambda p: (p["memorized"], -p["val_acc"])) if ok else None


def sweep_vision(s: Optional[VisionSettings] = None, layer_sets: Sequence[str] = SWEEP_LAYERS,
                 rhos: Sequence[float] = SWEEP_RHO, log: Optional[Callable[..., None]] = None) -> dict:
    """Layer subsets × ρ for the ViT arm: one factor collection (fc1/fc2 of every block, CLS token,
    sampled labels) and one eigendecomposition serve every point; each point is an edit of the
    subset's matrices, measured and undone. Returns the grid, the original's numbers and the best
    point by :func:`best_vision_point` (lowest memorized with validation accuracy within 2 points)."""
    import curvfast

    s = s or VisionSettings()
    log = log or (lambda *a: print(*a, file=sys.stderr, flush=True))
    model, data, meta = _prepare(s, log)

    def measure() -> dict:
        return _measure(model, data)

    base = measure()
    batches = _factor_batches(data, s.factor_batch_size)
    t0 = time.perf_counter()
    factors = curvfast.collect_factors(model, batches, modules="mlp", layers=list(range(s.num_layers)),
                                       fisher="true", seed=s.seed, progress=s.progress)
    eigen = curvfast.eigendecompose(factors, progress=False)
    factor_s = time.perf_counter() - t0
    from tqdm.auto import tqdm

    points = []
    bar = tqdm(total=len(layer_sets) * len(rhos), desc="ViT sweep", disable=not s.progress, dynamic_ncols=True)
    for spec in layer_sets:
        layers = _layer_set(spec, s.num_layers)
        names = [n for n in eigen if any(f".{i}." in f".{n}." for i in layers)]
        if not names:
            raise ValueError(f"layer set {spec!r} selects no edited module among {list(eigen)}")
        for rho in rhos:
            bar.update(1)
            res = curvfast.edit_model(model, eigen, rho=float(rho), modules=names)
            try:
                points.append(dict(layers=spec, blocks=layers, rho=float(rho), **measure(),
                                   rel_change=sum(r["rel_change"] for r in res.reports.values()) / len(res.reports)))
            finally:
                res.undo()
    bar.close()
    best = best_vision_point(points, base)
    return {"settings": asdict(s), "baseline": base, "points": points, "best": best,
            "rule": "lowest memorized with validation accuracy ≥ original − 2 points",
            "timings": {"factors_eigen_s": factor_s}}


def format_vision_sweep(sw: dict) -> str:
    base = sw["baseline"]
    head = f"{'layers':<12} {'rho':>5} {'memorized':>9} {'÷ base':>7} {'true-label acc':>14} {'val acc':>8} {'Δval':>6}"
    lines = [head, "-" * len(head),
             f"{'original':<12} {'':>5} {base['memorized']:>9.1%} {'':>7} {base['true_label_acc']:>14.1%} "
             f"{base['val_acc']:>8.1%} {'':>6}"]
    for p in sw["points"]:
        ratio = p["memorized"] / base["memorized"] if base["memorized"] else float("nan")
        lines.append(f"{p['layers']:<12} {p['rho']:>5g} {p['memorized']:>9.1%} {ratio:>7.2f} "
                     f"{p['true_label_acc']:>14.1%} {p['val_acc']:>8.1%} {100 * (p['val_acc'] - base['val_acc']):>+6.1f}")
    b = sw["best"]
    lines.append(f"best ({sw['rule']}): " + (f"layers {b['layers']}, rho {b['rho']:g}" if b else "none qualifies"))
    return "\n".join(lines)
