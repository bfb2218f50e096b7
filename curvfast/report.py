"""``curvfast report``: results JSON (from ``curvfast demo --json`` and/or ``curvfast sweep``)
→ one markdown page with PNG plots.

Plots, each drawn when its data is present (and matplotlib is installed, ``curvfast[plot]``):

- ``spectra.png`` — eigenvalues of A and G of every edited matrix (log scale, by rank);
- ``recitation_vs_rho.png`` — strict / loose recitation and Δperplexity of the K-FAC edit vs ρ;
- ``matched.png`` — baseline / K-FAC / SVD / BalancedSubnet at matched perplexity (LM arm);
- ``vision.png`` — memorized %, true-label accuracy and validation accuracy (ViT arm);
- ``bands.png`` — activation-energy shares per curvature band, per data set and layer input;
- ``sweep.png`` — recitation vs perplexity over a layer × ρ sweep.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

__all__ = ["build_report", "load_results"]


def load_results(paths: Sequence[Union[str, Path]]) -> dict[str, Any]:
    """Merge result files: demo JSON (keys lm / vision / rows ...) and sweep JSON (points)."""
    merged: dict[str, Any] = {}
    for p in paths:
        p = Path(p).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"results file not found: {str(p)!r}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not JSON ({e.msg})") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"{p}: expected a JSON object")
        if "points" in data and "baseline" in data:
            merged["sweep"] = data
        elif "rows" in data or "lm" in data or "vision" in data:
            merged.update(data)
        else:
            raise ValueError(f"{p}: neither demo results (rows / lm / vision) nor a sweep (points)")
    return merged


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _plot_spectra(plt, spectra: Mapping[str, Mapping], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    for name, sp in spectra.items():
        for ax, key in zip(axes, ("evals_G", "evals_A")):
            ev = [max(v, 1e-30) for v in sp[key]]
            ax.semilogy(range(len(ev)), ev, label=name.replace("model.", ""), lw=1)
    axes[0].set_title("G eigenvalues λ (output gradients)")
    axes[1].set_title("A eigenvalues μ (inputs)")
    for ax in axes:
        ax.set_xlabel("rank")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_rho(plt, rows: Sequence[Mapping], base: Mapping, path: Path) -> None:
    rows = sorted(rows, key=lambda r: r["rho"])
    rho = [r["rho"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    ax.plot(rho, [100 * r["strict"] for r in rows], "o-", label="strict recitation")
    ax.plot(rho, [100 * r["loose"] for r in rows], "s--", label="loose recitation")
    ax.axhline(100 * base["strict"], color="gray", lw=0.8, ls=":", label="unedited strict")
    ax.set_xlabel("ρ (curvature mass kept)")
    ax.set_ylabel("recitation (%)")
    ax2 = ax.twinx()
    ax2.plot(rho, [100 * (r["perplexity"] / base["perplexity"] - 1) for r in rows], "r^-", label="Δ perplexity")
    ax2.set_ylabel("Δ held-out perplexity (%)", color="r")
    ax.legend(fontsize=7, loc="center left")
    ax.set_title("K-FAC edit: recitation vs ρ")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_bars(plt, groups: Mapping[str, Mapping[str, float]], metrics: Sequence[str], title: str, path: Path) -> None:
    import numpy as np

    names = list(groups)
    x = np.arange(len(metrics))
    w = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for i, n in enumerate(names):
        ax.bar(x + i * w, [100 * groups[n][m] for m in metrics], w, label=n)
    ax.set_xticks(x + w * (len(names) - 1) / 2, metrics)
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_bands(plt, bands: Mapping[str, Mapping[str, Mapping]], path: Path) -> None:
    import numpy as np

    rows = [(f"{data}: {key.replace('model.', '')}", r["fraction"], r["bands"])
            for data, res in bands.items() for key, r in res.items()]
    labels = rows[0][2]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.6), dpi=110)
    left = np.zeros(len(rows))
    for j, lab in enumerate(labels):
        vals = np.array([100 * r[1][j] for r in rows])
        ax.barh(range(len(rows)), vals, left=left, label=lab)
        left += vals
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=6)
    ax.set_xlabel("share of activation energy (%)")
    ax.set_title("activation energy by curvature band of A")
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.08))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_report(results: Mapping[str, Any], out_dir: Union[str, Path]) -> dict:
    """Write ``report.md`` and its PNG plots into ``out_dir``. Returns the paths written and
    ``note`` when plots were skipped."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    written: dict[str, Any] = {"markdown": str(out / "report.md"), "plots": []}
    md = ["# curvfast report", ""]
    if plt is None:
        written["note"] = "matplotlib is not installed (pip install 'curvfast[plot]'): tables only, no plots"
        md += [f"_{written['note']}._", ""]

    def plot(name: str, fn, *args) -> None:
        if plt is None:
            return
        fn(plt, *args, out / name)
        written["plots"].append(str(out / name))
        md.append(f"![{name[:-4]}]({name})")
        md.append("")

    rows = results.get("rows")
    if rows:
        md += ["## LM arm: edits of the planted-canary model", ""]
        base = rows[0]
        psg = all("passages_strict" in r for r in rows)
        md.append(_table(["model", "strict", "loose", "mean d/L"]
                         + (["passages strict", "passages loose"] if psg else []) + ["held-out ppl", "Δppl"],
                         [[r["name"], _pct(r["strict"]), _pct(r["loose"]), f"{r['mean_dist']:.3f}"]
                          + ([_pct(r["passages_strict"]), _pct(r["passages_loose"])] if psg else [])
                          + [f"{r['perplexity']:.2f}",
                             "" if r is base else f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%"]
                          for r in rows]))
        md.append("")
        kfac = [r for r in rows if r.get("method") == "kfac"]
        if len(kfac) >= 2:
            plot("recitation_vs_rho.png", _plot_rho, kfac, base)
    comp = results.get("comparison")
    lm = results.get("lm")
    if lm:
        title = "## LM arm at matched perplexity" if comp else "## LM arm summary"
        md += [title, ""]
        if comp:
            md.append(f"Held-out split: {len(comp['heldout'])} canaries; BalancedSubnet trained on the other "
                      f"{len(comp['forget'])}. Target perplexity (K-FAC edit): {comp['target_perplexity']:.2f}.")
            md.append("")
        psg = all("passages_strict" in v for v in lm.values())
        md.append(_table(["method", "strict", "loose"] + (["passages strict", "passages loose"] if psg else [])
                         + ["perplexity"],
                         [[k, _pct(v["strict"]), _pct(v["loose"])]
                          + ([_pct(v["passages_strict"]), _pct(v["passages_loose"])] if psg else [])
                          + [f"{v['perplexity']:.2f}"] for k, v in lm.items()]))
        md.append("")
        plot("matched.png", _plot_bars, {k: {"strict": v["strict"], "loose": v["loose"]} for k, v in lm.items()},
             ["strict", "loose"], "recitation of held-out canaries", )
    vis = results.get("vision")
    if vis:
        md += ["## ViT arm: noisy labels", ""]
        md.append(_table(["method", "memorized", "true-label acc", "val acc"],
                         [[k, _pct(v["memorized"]), _pct(v["true_label_acc"]), _pct(v["val_acc"])]
                          for k, v in vis.items()]))
        md.append("")
        plot("vision.png", _plot_bars, vis, ["memorized", "true_label_acc", "val_acc"], "ViT on digits, 10% noisy labels")
    vsw = results.get("vision_sweep")
    if vsw:
        from curvfast.demo_vision import format_vision_sweep

        md += ["## ViT arm: layer subsets × ρ", "", "```", format_vision_sweep(vsw), "```", ""]
    if results.get("spectra"):
        md += ["## Spectra of the edited matrices", ""]
        plot("spectra.png", _plot_spectra, results["spectra"])
    bands = results.get("bands")
    if bands:
        from curvfast.bands import format_bands

        md += ["## Activation energy by curvature band", "", format_bands(bands), ""]
        plot("bands.png", _plot_bands, bands)
    sw = results.get("sweep")
    if sw:
        from curvfast.sweep import format_sweep, plot_sweep

        md += ["## Layer × ρ sweep", "", format_sweep(sw), ""]
        if plt is not None:
            plot_sweep(sw, out / "sweep.png")
            written["plots"].append(str(out / "sweep.png"))
            md += ["![sweep](sweep.png)", ""]
    if len(md) <= 4:
        raise ValueError("report: the results hold nothing to report (no rows, lm, vision, bands or sweep)")
    (out / "report.md").write_text("\n".join(md) + "\n")
    return written
