"""Which weights to track and edit: architecture presets, globs and layer selection.

Weights are handled in their mathematical orientation ``W: (d_out, d_in)``, ``y = W x``.
``nn.Linear`` stores exactly that; transformers' GPT-2 ``Conv1D`` stores ``(d_in, d_out)``.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

try:  # GPT-2 style layers; transformers is a dependency, but keep this module importable alone
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    pattern: str  # regex with groups (layer index, projection name)
    inputs: tuple[str, ...]  # projections that read the MLP input (edited by the paper)
    outputs: tuple[str, ...]


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "olmo3", "gemma", "gemma2", "phi3", "mixtral"),
           r"(?:^|\.)layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)$", ("gate_proj", "up_proj"), ("down_proj",)),
    Family("gpt2", ("gpt2",), r"(?:^|\.)h\.(\d+)\.mlp\.(c_fc|c_proj)$", ("c_fc",), ("c_proj",)),
    Family("gpt_neox", ("gpt_neox",), r"(?:^|\.)layers\.(\d+)\.mlp\.(dense_h_to_4h|dense_4h_to_h)$",
           ("dense_h_to_4h",), ("dense_4h_to_h",)),
    # transformers ≥ 5 names ViT's MLP layers.N.mlp.fc1/fc2; older releases layer.N.intermediate/output.dense
    Family("vit", ("vit", "deit"), r"(?:^|\.)layers?\.(\d+)\.(?:mlp\.)?(fc1|fc2|intermediate|output)(?:\.dense)?$",
           ("fc1", "intermediate"), ("fc2", "output")),
)
PRESETS = {"mlp": ("inputs", "outputs"), "mlp_in": ("inputs",), "mlp_out": ("outputs",)}

LayerSpec = Union[None, int, str, Sequence[int]]
ModuleSpec = Union[str, Sequence[str]]


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (d_out, d_in) — a view, never a copy."""
    if isinstance(module, nn.Linear):
        return module.weight
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.t()
    raise TypeError(f"unsupported module type {type(module).__name__}; curvfast edits nn.Linear and Conv1D")


def dims(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a supported module."""
    w = weight_matrix(module)
    return int(w.shape[0]), int(w.shape[1])


def detect_family(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    names = [n for n, _ in model.named_modules()]
    for fam in FAMILIES:
        if any(re.search(fam.pattern, n) for n in names):
            return fam
    raise ValueError(f"cannot detect the MLP layout of {type(model).__name__} (model_type={model_type!r}); "
                     f"pass module names or globs instead of a preset (families known: "
                     f"{', '.join(f.name for f in FAMILIES)})")


def layer_index(model: nn.Module, name: str) -> Optional[int]:
    """Transformer block index of a module name, or None when it has none."""
    fam = None
    try:
        fam = detect_family(model)
    except ValueError:
        pass
    if fam is not None:
        m = re.search(fam.pattern, name)
        if m:
            return int(m.group(1))
    m = re.search(r"\.(\d+)\.", "." + name + ".")
    return int(m.group(1)) if m else None


def num_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if cfg is not None and isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    idx = [layer_index(model, n) for n, _ in model.named_modules()]
    idx = [i for i in idx if i is not None]
    if not idx:
        raise ValueError("cannot tell how many layers the model has")
    return max(idx) + 1


def parse_layers(spec: LayerSpec, n_layers: int) -> Optional[list[int]]:
    """Layer selection: None (all), an int, a list, or a string such as "23,24,25", "20-25",
    "upper" (upper half), "lower" (lower half), "-3:" (Python slice). Negative indices count
    from the end."""
    if spec is None:
        return None
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("all", ""):
            return None
        if s == "upper":
            return list(range(n_layers // 2, n_layers))
        if s == "lower":
            return list(range(0, n_layers // 2))
        out: list[int] = []
        for part in s.split(","):
            part = part.strip()
            if ":" in part:
                a, b = part.split(":", 1)
                out.extend(range(n_layers)[slice(int(a) if a else None, int(b) if b else None)])
            elif re.fullmatch(r"-?\d+-\d+", part):
                a, b = part.rsplit("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif re.fullmatch(r"-?\d+", part):
                out.append(int(part))
            else:
                raise ValueError(f"bad layer selection {spec!r}: use e.g. '23,24,25', '20-25', '-3:', 'upper'")
        spec = out
    layers = []
    for i in spec:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ValueError(f"layer {i} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        layers.append(j)
    return sorted(set(layers))


def resolve_modules(model: nn.Module, modules: ModuleSpec = "mlp", layers: LayerSpec = None) -> list[str]:
    """Names of the modules selected by ``modules`` (preset, exact names or globs) and ``layers``.

    Presets: "mlp" (all MLP projections), "mlp_in" (gate/up, c_fc, fc1: the weights the paper
    edits), "mlp_out" (down_proj, c_proj, fc2). Returned in the model's module order.
    """
    specs = [modules] if isinstance(modules, str) else list(modules)
    if not specs:
        raise ValueError("no modules selected")
    named = dict(model.named_modules())
    selected: set[str] = set()
    for spec in specs:
        if spec in PRESETS:
            fam = detect_family(model)
            projections = sum((getattr(fam, k) for k in PRESETS[spec]), ())
            hits = [n for n in named if (m := re.search(fam.pattern, n)) and m.group(2) in projections]
        elif spec in named:
            hits = [spec]
        else:
            hits = [n for n in named if fnmatch.fnmatchcase(n, spec)]
        hits = [n for n in hits if is_supported(named[n])]
        if not hits:
            example = next((n for n, m in named.items() if is_supported(m)), "model.layers.0.mlp.up_proj")
            raise ValueError(f"module pattern {spec!r} matches no Linear/Conv1D module of {type(model).__name__} "
                             f"(presets: {', '.join(PRESETS)}; example name: {example!r})")
        selected.update(hits)
    chosen = parse_layers(layers, num_layers(model)) if layers is not None else None
    if chosen is not None:
        selected = {n for n in selected if layer_index(model, n) in chosen}
        if not selected:
            raise ValueError(f"no selected module lies in layers {chosen}")
    return [n for n in named if n in selected]


