"""The eval figure (reports/eval/loss_curves.png) and the loss chart MLflow shows: read at a glance.

* Left: validation loss of the new and the old language on one axis, against tokens seen (labels like ``80k``, a
  handful of ticks, so they never collide).
* Middle and right: per source, the gain on new-language text (base - cpt, > 0 = learned) and the forgetting on
  old-language text (cpt - base, > 0 = forgotten): the sign used everywhere in cpt, each on its own axis. On one
  shared axis the new-language gains (~10-15 bpb on scripts the base never saw) would flatten the old language's forgetting
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


# The panels' words, in cpt's one sign (gain > 0 learned, forgetting > 0 forgotten), as report.md, the README, MLflow
# and Prefect print the same numbers. The PNG carries them as text metadata ("Panels"), so a test or a reader can
# check a figure's labels without looking at pixels.
PANELS = {
    "gain": ("new languages, per source: gain (> 0 = learned)", "gain = bpb(base) - bpb(cpt), bits per byte"),
    "forgetting": ("old language, per source: forgetting (> 0 = forgotten)",
                   "forgetting = bpb(cpt) - bpb(base), bits per byte"),
}


def bar_label(value: float) -> str:
    """A bar's value as drawn (and as the README rounds it: 3 decimals below 1 bpb, 2 above)."""
    return f"{value:+.3f}" if abs(value) < 1 else f"{value:+.2f}"


def bars(rows: list[dict[str, Any]], kind: str) -> list[tuple[str, float]]:
    """``(source, value)`` per source in the panel's sign: gain = base - cpt, forgetting = cpt - base."""
    return [(r["source"], r["base"] - r["cpt"] if kind == "gain" else r["cpt"] - r["base"]) for r in rows]


def _panel(ax: Any, rows: list[dict[str, Any]], kind: str) -> list[str]:
    """One bar per source; green = good (gain > 0, forgetting <= 0), red = bad. Returns the labels drawn."""
    title, xlabel = PANELS[kind]
    if not rows:
        ax.set_axis_off()
        ax.set_title(title + ": no sources", fontsize=10)
        return []
    names, vals = zip(*bars(rows, kind))
    ys = list(range(len(vals)))
    good = [(v >= 0) if kind == "gain" else (v <= 0) for v in vals]
    ax.barh(ys, vals, color=["tab:green" if g else "tab:red" for g in good], height=0.6)
    ax.set_yticks(ys, list(names), fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    span = max(abs(v) for v in vals) or 1.0
    labels = []
    for y, name, v in zip(ys, names, vals):
        labels.append(f"{name} {bar_label(v)}")
        ax.text(v + (0.02 * span if v >= 0 else -0.02 * span), y, bar_label(v),
                va="center", ha="left" if v >= 0 else "right", fontsize=7)
    ax.set_xlim(min(0.0, min(vals)) - 0.3 * span, max(0.0, max(vals)) + 0.3 * span)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # "-0.075-0.050-0.025" ran together at the default density
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return labels


def write_figure(path: Path, curve: dict[str, list[float]], rows: list[dict[str, Any]]) -> str | None:
    """The PNG, or the reason it could not be drawn."""
    try:
        plt = _plt()
    except ImportError:
        return "matplotlib is not installed (pip install 'cpt[data]'), so the figure was not drawn"
    from cpt.io import atomic_open

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    draw_loss(ax1, curve)
    text = []
    for ax, kind, domain_rows in ((ax2, "gain", [r for r in rows if r["domain"] == "new"]),
                                  (ax3, "forgetting", [r for r in rows if r["domain"] != "new"])):
        text += [PANELS[kind][0], *_panel(ax, domain_rows, kind)]
    fig.tight_layout()
    with atomic_open(path, "wb", encoding=None) as fh:
        fig.savefig(fh, format="png", dpi=110, metadata={"Software": None, "Panels": "\n".join(text)})
    plt.close(fig)
    return None


def loss_chart(path: Path, curve: dict[str, list[float]]) -> bool:
    """The left panel alone (old and new loss on one chart), for MLflow's chart view; False without matplotlib."""
    try:
        plt = _plt()
    except ImportError:
        return False
    from cpt.io import atomic_open

    # 720 x 432: read at its natural size both in MLflow's artifacts view and inside a run description (whose
    # markdown drops width attributes, so a larger image would overflow the column and push the text out of view)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    draw_loss(ax, curve)
    fig.tight_layout()
    with atomic_open(path, "wb", encoding=None) as fh:
        fig.savefig(fh, format="png", dpi=96, metadata={"Software": None})
    plt.close(fig)
    return True
