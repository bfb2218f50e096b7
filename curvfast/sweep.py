"""Layer-subset × ρ sweep of the curvature edit (SPEC §3: the authors swept layers and ρ by hand).

One factor collection and one eigendecomposition serve every point: a point only redoes the
edit (:func:`curvfast.edit_model` on its subset at its ρ), scores it, and undoes it, so the
model is bit-for-bit the original between points and after the sweep (also on errors).

Each point is scored on a held-out split of memorized sequences (strict / loose recitation,
mean d/L) and on held-out text (perplexity). The best setting is named by a stated rule:

    lowest strict recitation among the points whose held-out perplexity rises at most
    ``max_ppl_increase`` over the unedited model; ties → lower loose recitation, then lower
    perplexity. No point within the budget → no best (said so).

:func:`write_sweep` writes the table as JSON and markdown and a Pareto plot (strict recitation
vs perplexity) as PNG when matplotlib is installed (``pip install curvfast[plot]``).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

__all__ = ["layer_subsets", "sweep", "pick_best", "pareto_front", "write_sweep", "format_sweep", "BEST_RULE"]

BEST_RULE = ("lowest strict recitation among points with held-out perplexity increase <= {budget:.0%}; "
             "ties -> lower loose recitation, then lower perplexity")


def layer_subsets(model: nn.Module, eigen: Mapping, specs: Sequence[str], modules: Any = "mlp_in") -> dict[str, list[str]]:
    """Subset label → module names: for each layer spec ('upper', '-2:', '1,2', 'all'), the
    modules of ``modules`` in those layers that have an eigenbasis in ``eigen``."""
    from curvfast.modules import resolve_modules

    out: dict[str, list[str]] = {}
    for spec in specs:
        layers = None if spec == "all" else spec
        names = [n for n in resolve_modules(model, modules, layers) if n in eigen]
        if not names:
            raise ValueError(f"sweep: layer set {spec!r} selects no module with an eigenbasis "
                             f"(eigenbases exist for {len(eigen)} modules: collect factors for these layers)")
        out[spec] = names
    return out


def _measure(model: nn.Module, memorized: Sequence[Any], heldout: Any, prefix_len: Optional[int],
             suffix_len: int, batch_size: int) -> dict:
    from curvfast.evaluate import perplexity, recitation

    rec = recitation(model, memorized, prefix_len=prefix_len, suffix_len=suffix_len, batch_size=batch_size,
                     progress=False)
    ppl = perplexity(model, heldout, progress=False)
    return {"strict": rec["strict"], "loose": rec["loose"], "mean_dist": rec["mean_dist"], "n": rec["n"],
            "perplexity": ppl["perplexity"], "perplexity_mean_batch_exp": ppl["perplexity_mean_batch_exp"]}


def pareto_front(points: Sequence[Mapping]) -> list[int]:
    """Indices of points not dominated in (strict, perplexity): no other point is at least as
    good in both and better in one. Sorted by perplexity."""
    front = []
    for i, a in enumerate(points):
        dominated = any(
            (b["strict"] <= a["strict"] and b["perplexity"] <= a["perplexity"])
            and (b["strict"] < a["strict"] or b["perplexity"] < a["perplexity"])
            for j, b in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i]["perplexity"], points[i]["strict"]))


def pick_best(points: Sequence[Mapping], base_perplexity: float, max_ppl_increase: float) -> Optional[int]:
    """Index of the best point by :data:`BEST_RULE`, or None when none is within the budget."""
    ok = [i for i, p in enumerate(points) if p["perplexity"] <= base_perplexity * (1.0 + max_ppl_increase)]
    if not ok:
        return None
    return min(ok, key=lambda i: (points[i]["strict"], points[i]["loose"], points[i]["perplexity"]))


def sweep(
    model: nn.Module,
    eigen: Mapping,
    subsets: Mapping[str, Sequence[str]],
    rhos: Sequence[float],
    memorized: Sequence[Any],
    heldout: Any,
    prefix_len: Optional[int] = 64,
    suffix_len: int = 48,
    max_ppl_increase: float = 0.10,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Edit, score and undo every (layer subset, ρ) point; name the best (see the module doc).

    subsets: label → module names (see :func:`layer_subsets`); every name needs a basis in
        ``eigen``. memorized: held-out memorized sequences or (prefix, suffix) pairs, as for
        :func:`curvfast.evaluate.recitation`. heldout: held-out text, as for
        :func:`curvfast.evaluate.perplexity`.
    Returns ``{"baseline", "points", "best", "best_index", "pareto", "rule", "max_ppl_increase"}``;
    each point has ``subset``, ``modules``, ``rho``, the scores, ``delta_ppl`` (relative) and
    ``rel_change`` (mean ‖ΔW‖/‖W‖).
    """
    from curvfast.edit import edit_model

    for r in rhos:
        if not (isinstance(r, (int, float)) and math.isfinite(r) and 0.0 <= r <= 1.0):
            raise ValueError(f"sweep: every rho must be in [0, 1], got {r!r}")
    for label, names in subsets.items():
        missing = [n for n in names if n not in eigen]
        if missing:
            raise KeyError(f"sweep: subset {label!r} has modules without an eigenbasis: {missing}")
    base = _measure(model, memorized, heldout, prefix_len, suffix_len, batch_size)
    grid = [(label, float(r)) for label in subsets for r in rhos]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), desc="sweep", leave=False, dynamic_ncols=True)
    points = []
    try:
        for label, rho in grid:
            res = edit_model(model, eigen, rho=rho, modules=list(subsets[label]))
            try:
                scores = _measure(model, memorized, heldout, prefix_len, suffix_len, batch_size)
            finally:
                res.undo()
            rel = [r["rel_change"] for r in res.reports.values()]
            points.append({"subset": label, "modules": list(subsets[label]), "rho": rho, **scores,
                           "delta_ppl": scores["perplexity"] / base["perplexity"] - 1.0,
                           "rel_change": sum(rel) / len(rel)})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(subset=label, rho=rho, strict=f"{scores['strict']:.0%}")
    finally:
        if bar is not None:
            bar.close()
    best = pick_best(points, base["perplexity"], max_ppl_increase)
    return {"baseline": base, "points": points, "best_index": best,
            "best": None if best is None else points[best], "pareto": pareto_front(points),
            "rule": BEST_RULE.format(budget=max_ppl_increase), "max_ppl_increase": max_ppl_increase}


def format_sweep(result: Mapping) -> str:
    """The sweep as a markdown table, best point marked, rule stated."""
    base = result["baseline"]
    lines = ["| layers | ρ | strict | loose | mean d/L | held-out ppl | Δppl | ‖ΔW‖/‖W‖ | |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| (unedited) | | {base['strict']:.1%} | {base['loose']:.1%} | {base['mean_dist']:.3f} | "
             f"{base['perplexity']:.2f} | | | |"]
    pareto = set(result.get("pareto", []))
    for i, p in enumerate(result["points"]):
        mark = ("**best**" if i == result.get("best_index") else "") + (" pareto" if i in pareto else "")
        lines.append(f"| {p['subset']} | {p['rho']:g} | {p['strict']:.1%} | {p['loose']:.1%} | {p['mean_dist']:.3f} | "
                     f"{p['perplexity']:.2f} | {100 * p['delta_ppl']:+.1f}% | {p['rel_change']:.3f} | {mark.strip()} |")
    best = result.get("best")
    lines.append("")
    lines.append(f"Rule: {result['rule']}.")
    if best is None:
        lines.append("No point stays within the perplexity budget: no best setting.")
    else:
        lines.append(f"Best: layers {best['subset']}, ρ = {best['rho']:g} — strict {best['strict']:.1%} "
                     f"(from {base['strict']:.1%}), perplexity {best['perplexity']:.2f} ({100 * best['delta_ppl']:+.1f}%).")
    return "\n".join(lines)


def plot_sweep(result: Mapping, path: Union[str, Path]) -> Optional[str]:
    """Pareto plot (strict recitation vs held-out perplexity) as PNG. Returns None when written,
    else the reason (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'curvfast[plot]'): no plot written"
    base, points = result["baseline"], result["points"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    labels = list(dict.fromkeys(p["subset"] for p in points))
    for lab in labels:
        pts = [p for p in points if p["subset"] == lab]
        ax.plot([p["perplexity"] for p in pts], [100 * p["strict"] for p in pts], "o-", label=f"layers {lab}",
                alpha=0.8)
        for p in pts:
            ax.annotate(f"{p['rho']:g}", (p["perplexity"], 100 * p["strict"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    front = [points[i] for i in result.get("pareto", [])]
    if front:
        ax.step([p["perplexity"] for p in front], [100 * p["strict"] for p in front], "k--", where="post",
                lw=0.8, label="Pareto front")
    ax.plot([base["perplexity"]], [100 * base["strict"]], "k*", ms=12, label="unedited")
    ax.axvline(base["perplexity"] * (1 + result["max_ppl_increase"]), color="gray", lw=0.8, ls=":",
               label=f"+{result['max_ppl_increase']:.0%} perplexity")
    if result.get("best") is not None:
        b = result["best"]
        ax.plot([b["perplexity"]], [100 * b["strict"]], "o", ms=14, mfc="none", mec="red", label="best")
    ax.set_xlabel("held-out perplexity")
    ax.set_ylabel("strict recitation, held-out memorized (%)")
    ax.set_title("curvfast sweep: layers × ρ")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def write_sweep(result: Mapping, out_dir: Union[str, Path]) -> dict:
    """Write ``sweep.json``, ``sweep.md`` and ``sweep.png`` into ``out_dir``.
    Returns the paths written and, if the plot was skipped, ``note``."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": str(out / "sweep.json"), "markdown": str(out / "sweep.md")}
    (out / "sweep.json").write_text(json.dumps(result, indent=1, default=float))
    md = "# curvfast sweep\n\n" + format_sweep(result) + "\n"
    note = plot_sweep(result, out / "sweep.png")
    if note is None:
        written["plot"] = str(out / "sweep.png")
        md += "\n![strict recitation vs perplexity](sweep.png)\n"
    else:
        written["note"] = note
        md += f"\n({note})\n"
    (out / "sweep.md").write_text(md)
    return written
