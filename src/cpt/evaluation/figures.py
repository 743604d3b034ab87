"""The eval figure (reports/eval/loss_curves.png) and the loss chart MLflow shows: read at a glance.

* Left: validation loss of the new and the old language on one axis, against tokens seen (labels like ``80k``, a
  handful of ticks, so they never collide).
* Middle and right: per source, bits per byte saved by continual pretraining (base - cpt: > 0 is better, the sign
  used everywhere in cpt), new languages and the old language each on their own axis. On one shared axis the
  new-language gains (~10-15 bpb on scripts the base never saw) would flatten the old language's forgetting
  (~0.05 bpb) to nothing, and the forgetting is the number the promotion gate watches.

matplotlib is imported lazily: the eval path must run on a box with only the training dependencies.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

NEW_COLOR, OLD_COLOR = "tab:blue", "tab:orange"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_loss(ax: Any, curve: dict[str, list[float]]) -> None:
    """Validation loss, new vs old language, on one axis (x: tokens when logged, else steps)."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    if not curve:
        ax.text(0.5, 0.5, "metrics/train_curve.csv not found", ha="center", va="center", transform=ax.transAxes)
        return
    x_key = "tokens" if any(not math.isnan(v) for v in curve.get("tokens", [])) else "step"
    for key, label, color in (("loss_new", "new language (val)", NEW_COLOR),
                              ("loss_old", "old language (val, replayed)", OLD_COLOR)):
        pts = [(x, y) for x, y in zip(curve[x_key], curve.get(key, [])) if not math.isnan(y)]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=label, color=color)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("tokens seen" if x_key == "tokens" else "step")
    ax.set_ylabel("loss (nats/token, cpt tokenizer)")
    ax.set_title("continual pretraining: validation loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)


def _deltas(ax: Any, rows: list[dict[str, Any]], title: str) -> None:
    if not rows:
        ax.set_axis_off()
        ax.set_title(title + ": no sources")
        return
    vals = [r["base"] - r["cpt"] for r in rows]
    ys = list(range(len(rows)))
    colors = ["tab:green" if v >= 0 else "tab:red" for v in vals]
    ax.barh(ys, vals, color=colors, height=0.6)
    ax.set_yticks(ys, [r["source"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    span = max(abs(v) for v in vals) or 1.0
    for y, v in zip(ys, vals):
        ax.text(v + (0.02 * span if v >= 0 else -0.02 * span), y, f"{v:+.3f}" if abs(v) < 1 else f"{v:+.2f}",
                va="center", ha="left" if v >= 0 else "right", fontsize=7)
    ax.set_xlim(min(0.0, min(vals)) - 0.3 * span, max(0.0, max(vals)) + 0.3 * span)
    ax.set_xlabel("bpb saved: base - cpt (> 0 better)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def write_figure(path: Path, curve: dict[str, list[float]], rows: list[dict[str, Any]]) -> str | None:
    """The PNG, or the reason it could not be drawn."""
    try:
        plt = _plt()
    except ImportError:
        return "matplotlib is not installed (pip install 'cpt[data]'), so the figure was not drawn"
    from cpt.io import atomic_open

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    draw_loss(ax1, curve)
    _deltas(ax2, [r for r in rows if r["domain"] == "new"], "new languages, per source")
    _deltas(ax3, [r for r in rows if r["domain"] != "new"], "old language, per source (< 0: forgotten)")
    fig.tight_layout()
    with atomic_open(path, "wb", encoding=None) as fh:
        fig.savefig(fh, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return None


def loss_chart(path: Path, curve: dict[str, list[float]]) -> bool:
    """The left panel alone (old and new loss on one chart), for MLflow's chart view; False without matplotlib."""
    try:
        plt = _plt()
    except ImportError:
        return False
    from cpt.io import atomic_open

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    draw_loss(ax, curve)
    fig.tight_layout()
    with atomic_open(path, "wb", encoding=None) as fh:
        fig.savefig(fh, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return True
