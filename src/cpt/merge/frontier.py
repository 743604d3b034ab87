"""The frontier: which point to promote, and the picture of all of them on gain-vs-forgetting axes.

``choose``: the largest a whose point the gate promotes (vs the base, every source and language within budget):
the most of the cpt update the budget allows. Undecided is not a pass.

The axes are the gate's own binding numbers, so the budget line means what the gate means (``binding``):

- x: the forgetting the gate binds on: among every old-domain source and language, the one whose 95% interval
  reaches highest (the gate wants that upper bound <= ``gate.max_forgetting``). A language pooled over sources
  can sit well inside the budget while one source is far outside it (the demo: en +0.014 pooled, heldout_en
  +0.082); plotting the pooled number would draw a refused model left of the line.
- y: the gain the gate binds on: among every new-domain source and language, the one whose interval reaches
  lowest.

Each marker carries its 95% interval on both axes. The same function draws the merge points alone
(reports/merge/frontier.png) and with `dvc exp` sweeps (scripts/frontier.py). matplotlib is imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

MERGE_COLOR, EXP_COLOR, CHOSEN_COLOR = "tab:blue", "tab:green", "tab:red"


def _entries(m: dict[str, Any], kind: str) -> Iterable[tuple[str, float, list[float] | None]]:
    """(name, value, ci95) of every per-source and per-language ``kind`` ("gain" / "forgetting") number of an
    eval.json-shaped dict (metrics/eval.json, a merge point)."""
    for name, row in sorted((m.get("sources") or {}).items()):
        if isinstance(row, dict) and isinstance(row.get(kind), (int, float)):
            yield f"source {name}", float(row[kind]), row.get(f"{kind}_ci95")
    cis = m.get(f"{kind}_ci95") or {}
    for lang, value in sorted((m.get(kind) or {}).items()):
        if isinstance(value, (int, float)):
            yield f"lang {lang}", float(value), cis.get(lang)


def binding(m: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """``{"forgetting": {"name", "value", "ci95"}, "gain": {...}}``: the forgetting whose interval reaches highest
    and the gain whose interval reaches lowest (the value itself when there is no interval)."""
    out: dict[str, dict[str, Any] | None] = {}
    for kind, pick, edge in (("forgetting", max, 1), ("gain", min, 0)):
        rows = list(_entries(m, kind))
        if not rows:
            out[kind] = None
            continue
        name, value, ci = pick(rows, key=lambda r: r[2][edge] if r[2] else r[1])
        out[kind] = {"name": name, "value": value, "ci95": ci}
    return out


def choose(points: list[dict[str, Any]]) -> tuple[float | None, str]:
    """(the largest a the gate promotes, or None; the reason, naming what stopped the larger ones)."""
    ordered = sorted(points, key=lambda p: -p["alpha"])
    passing = [p for p in ordered if p["decision"] == "promote"]
    if not passing:
        return None, "no a passes the gate: " + "; ".join(f"a={p['alpha']:g}: {p['reason']}" for p in ordered)
    best = passing[0]
    above = [p for p in ordered if p["alpha"] > best["alpha"]]
    why = f"a={best['alpha']:g} is the largest a the gate promotes vs the base ({best['reason']})"
    if above:
        why += "; larger a: " + "; ".join(f"a={p['alpha']:g}: {p['reason']}" for p in above)
    return best["alpha"], why


def gain_kept(point: dict[str, Any], full: dict[str, Any]) -> dict[str, float | None]:
    """Per new language: the point's gain as a % of the full cpt model's (a = 1) gain."""
    return {lang: (round(100.0 * g / full["gain"][lang], 1) if full["gain"].get(lang) else None)
            for lang, g in sorted(point["gain"].items())}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _marker(ax: Any, b: dict[str, Any], color: str, label: str | None, size: float = 6, **kw: Any) -> None:
    f, g = b["forgetting"], b["gain"]
    x, y = f["value"], g["value"]
    xerr = [[x - f["ci95"][0]], [f["ci95"][1] - x]] if f.get("ci95") else None
    yerr = [[y - g["ci95"][0]], [g["ci95"][1] - y]] if g.get("ci95") else None
    ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt=kw.pop("marker", "o"), color=color, markersize=size, capsize=3,
                label=label, **kw)


def plot(out: Path, merge_points: list[dict[str, Any]], *, max_forgetting: float, min_gain: float,
         chosen: float | None = None, experiments: list[dict[str, Any]] | None = None,
         title: str = "merge: gain vs forgetting, theta(a) = (1 - a) base + a cpt") -> Path:
    """The frontier PNG (720 x 480 px at 100 dpi): merge points (``alpha`` + ``binding``) joined in order of a,
    experiments (``label`` + ``binding``) as separate markers, the forgetting budget as a vertical line, the gain
    budget as a horizontal one, the chosen point ringed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=100)
    pts = sorted((p for p in merge_points if p["binding"]["forgetting"] and p["binding"]["gain"]),
                 key=lambda p: p["alpha"])
    if pts:
        ax.plot([p["binding"]["forgetting"]["value"] for p in pts], [p["binding"]["gain"]["value"] for p in pts],
                "-", color=MERGE_COLOR, alpha=0.5)
    for i, p in enumerate(pts):
        _marker(ax, p["binding"], MERGE_COLOR, "merge points (a)" if i == 0 else None)
        ax.annotate(f"a={p['alpha']:g}", (p["binding"]["forgetting"]["value"], p["binding"]["gain"]["value"]),
                    textcoords="offset points", xytext=(6, -12), fontsize=9, color=MERGE_COLOR)
        if chosen is not None and p["alpha"] == chosen:
            ax.plot([p["binding"]["forgetting"]["value"]], [p["binding"]["gain"]["value"]], "o", markersize=16,
                    markerfacecolor="none", markeredgecolor=CHOSEN_COLOR, markeredgewidth=2,
                    label=f"chosen: a={chosen:g}")
    for i, e in enumerate(x for x in experiments or [] if x["binding"]["forgetting"] and x["binding"]["gain"]):
        _marker(ax, e["binding"], EXP_COLOR, "dvc experiments" if i == 0 else None, marker="s")
        ax.annotate(e["label"], (e["binding"]["forgetting"]["value"], e["binding"]["gain"]["value"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8, color=EXP_COLOR)
    ax.axvline(max_forgetting, color=CHOSEN_COLOR, linestyle="--", linewidth=1,
               label=f"forgetting budget (upper 95% bound <= {max_forgetting:g})")
    ax.axhline(min_gain, color="grey", linestyle=":", linewidth=1, label=f"gain budget (lower bound >= {min_gain:g})")
    ax.set_xlabel("forgetting the gate binds on, bpb (> 0 = forgotten; old-domain source/language, highest bound)",
                  fontsize=9)
    ax.set_ylabel("gain the gate binds on, bpb (> 0 = learned;\nnew-domain source/language, lowest bound)",
                  fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Title": title, "Description": "x: forgetting (> 0 = forgotten), y: gain (> 0 = "
                               "learned), bits per byte, 95% intervals"})
    plt.close(fig)
    return out
