"""The README's results table, generated from the committed demo outputs (metrics/*.json), never typed by hand;
and the data stages' scaling tables (README and docs/scaling.md), from bench/results/scale.json.

    python scripts/readme_results.py          # rewrite the blocks between the markers
    python scripts/readme_results.py --check  # exit 1 if a block differs (tests/test_readme.py runs it)

One sign convention, as in the eval report: gain = bpb(base) - bpb(cpt) > 0 is learned; forgetting =
bpb(cpt) - bpb(base) > 0 is forgotten. Every gain and forgetting figure carries its 95% bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin (scripts/readme_results.py) -->", "<!-- results:end -->"
SCALE_BEGIN, SCALE_END = "<!-- scaling:begin (scripts/readme_results.py) -->", "<!-- scaling:end -->"
SCALE_FULL_BEGIN, SCALE_FULL_END = "<!-- scaling-full:begin (scripts/readme_results.py) -->", "<!-- scaling-full:end -->"
SCALE_JSON = Path("bench") / "results" / "scale.json"


def _read(root: Path, name: str) -> dict[str, Any]:
    path = root / "metrics" / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _ci(ci: Any, nd: int) -> str:
    return f" [{ci[0]:+.{nd}f}, {ci[1]:+.{nd}f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def _signed(value: Any, ci: Any = None, nd: int = 3) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:+.{nd}f}{_ci(ci, nd)}"


def _per_lang(values: dict[str, Any], cis: dict[str, Any], nd: int = 2) -> str:
    return "; ".join(f"{lang} {_signed(v, (cis or {}).get(lang), nd)}" for lang, v in sorted((values or {}).items()))


def rows(root: Path) -> list[tuple[str, str, str]]:
    tok, ev, gate, sft = (_read(root, n) for n in ("tokenizer", "eval", "gate", "sft"))
    out: list[tuple[str, str, str]] = []
    vi = (tok.get("languages") or {}).get("vi") or {}
    if vi:
        changed, docs = tok.get("old_language_changed_lines"), tok.get("old_language_changed_docs")
        out.append(("Vietnamese tokens per word, base -> extended",
                    f"{vi.get('tokens_per_word_base', float('nan')):.2f} -> {vi.get('tokens_per_word', float('nan')):.2f} "
                    f"({tok.get('added', 0):,} pieces; held-out English lines / documents changed: "
                    f"{'–' if changed is None else changed} / {'–' if docs is None else docs})", "`metrics/tokenizer.json`"))
    if ev.get("gain"):
        out.append(("gain, bits per byte [95% interval]", _per_lang(ev["gain"], ev.get("gain_ci95")), "`metrics/eval.json`"))
    if ev.get("forgetting"):
        out.append(("forgetting, pooled over sources", _per_lang(ev["forgetting"], ev.get("forgetting_ci95"), 3),
                    "`metrics/eval.json`"))
    old = {n: s for n, s in sorted((gate.get("per_source") or {}).items()) if s.get("metric") == "forgetting"}
    if old:
        out.append(("forgetting per English source: verdict",
                    "; ".join(f"{n} {_signed(s.get('value'), s.get('ci95'))}: {s.get('decision')}" for n, s in old.items()),
                    "`metrics/gate.json`"))
    if gate:
        th = gate.get("thresholds") or {}
        budget = ", ".join(f"{k} {th[k]}" for k in ("min_gain", "max_forgetting") if isinstance(th.get(k), (int, float)))
        out.append(("promotion gate (the worst source decides)",
                    f"**{gate.get('decision', '–')}**" + (f" ({budget})" if budget else ""), "`metrics/gate.json`"))
    down = _read(root, "downstream")
    if down.get("forgetting_en") or down.get("gain_new"):
        parts = [f"{name} {_signed(a.get('value'), a.get('ci95'), 1)} ({len(a.get('tasks') or [])} tasks)"
                 for name, a in (("English forgetting", down.get("forgetting_en")),
                                 ("new-language gain", down.get("gain_new"))) if a]
        rule = (down.get("gate") or {}).get("max_downstream_drop")
        out.append(("downstream tasks (lm-eval), accuracy points, mean over tasks",
                    "; ".join(parts) + ("" if rule is None else f"; rule max_downstream_drop {rule:g}: "
                                        f"**{down['gate'].get('decision')}**"), "`metrics/downstream.json`"))
    if sft:
        out.append(("sft: held-out assistant-token gain vs the cpt model", _per_lang(sft.get("gain"), sft.get("gain_ci95"), 3),
                    "`metrics/sft.json`"))
        out.append(("sft: plain-text forgetting vs the cpt model",
                    _per_lang(sft.get("forgetting"), sft.get("forgetting_ci95"), 3), "`metrics/sft.json`"))
        if (sft.get("gate") or {}).get("decision"):
            out.append(("sft: promotion gate", f"**{sft['gate']['decision']}**", "`metrics/sft.json`"))
    return out


def verdict(root: Path) -> str:
    """The sentences that say what the table means: each gate's decision and what decided it, in the table's numbers
    (hand-written prose with numbers went stale after every rerun)."""
    from cpt.ops.summary import deciding

    ev, gate, sft = (_read(root, n) for n in ("eval", "gate", "sft"))
    out = []
    if gate.get("decision"):
        th = gate.get("thresholds") or {}
        if gate["decision"] == "promote":
            out.append(f"The gate promotes this demo model: every source and language is within its budget (gain's "
                       f"lower bound >= {th.get('min_gain')}, forgetting's upper bound <= {th.get('max_forgetting')}).")
        else:
            pooled = "; ".join(f"{lang} {_signed(v, nd=3)}" for lang, v in sorted((ev.get("forgetting") or {}).items()))
            out.append(f"The gate says **{gate['decision']}** for this demo model, and that is the verdict working: "
                       f"{deciding(gate) or gate.get('reason', '')}. The worst source decides; the forgetting pooled "
                       f"over sources ({pooled}) is information only.")
    sgate = sft.get("gate") or {}
    if sgate.get("decision"):
        why = deciding(sgate) if sgate["decision"] != "promote" else ""
        out.append(f"The sft gate says **{sgate['decision']}**" + (f": {why}." if why else "."))
    return " ".join(out)


REAL_DEMO = Path("demos") / "smollm2"  # the second demo (make demo-real, docs/demo-real.md)


def block(root: Path) -> str:
    """The table; with a column for the real base (SmolLM2) once demos/smollm2 has run (its summary.json exists)."""
    prose = verdict(root)
    lines = [BEGIN] + ([prose, ""] if prose else [])
    real_root = root / REAL_DEMO
    if not (real_root / "metrics" / "summary.json").exists():
        lines += ["| what | demo (tiny base, CPU) | where |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows(root)]
        return "\n".join(lines + [END])
    tiny, real = rows(root), rows(real_root)
    real_by = {a: b for a, b, _ in real}
    order = [a for a, _, _ in tiny] + [a for a, _, _ in real if a not in {t for t, _, _ in tiny}]
    tiny_by = {a: (b, c) for a, b, c in tiny}
    where = {a: c for a, _, c in real} | {a: c for a, _, c in tiny}
    lines += ["| what | demo (tiny base, CPU) | real base: SmolLM2-135M (`make demo-real`) | where (real: under "
              f"`{REAL_DEMO.as_posix()}/`) |", "|---|---|---|---|"]
    lines += [f"| {a} | {tiny_by.get(a, ('not run',))[0]} | {real_by.get(a, '–')} | {where[a]} |" for a in order]
    return "\n".join(lines + [END])


def _scale(root: Path) -> dict[str, Any]:
    path = root / SCALE_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"rows": []}


def _by(rows: list[dict], gb: float, stage: str, workers: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["gb"] == gb and r["stage"] == stage and r["workers"] == workers), None)


def _nodes(key: str) -> str:
    n, c = key.split("x")
    return f"{n} node{'s' if int(n) > 1 else ''} x {c} cores"


def scale_block(root: Path) -> str:
    """Per stage: peak RSS of one process at each size, and wall time 1 -> 2 workers at the largest size."""
    res = _scale(root)
    rows = res["rows"]
    sizes = sorted({r["gb"] for r in rows})
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    big = sizes[-1] if sizes else 0
    lines = [SCALE_BEGIN, f"| stage | peak RSS per process, MB ({' / '.join(f'{g:g}' for g in sizes)} GB) | "
             f"wall s at {big:g} GB, 1 / 2 workers | speed-up | cores busy (CPU s / wall s), 1 / 2 |",
             "|---|---:|---:|---:|---:|"]
    for st in stages:
        rss = " / ".join(str(max(r["peak_rss_mb"] for r in rows if r["gb"] == g and r["stage"] == st)) for g in sizes
                         if any(r["gb"] == g and r["stage"] == st for r in rows))
        one, two = _by(rows, big, st, 1), _by(rows, big, st, 2)
        wall = f"{one['seconds']:g} / {two['seconds']:g}" if one and two else "–"
        speed = f"{one['seconds'] / two['seconds']:.2f}x" if one and two else "–"
        busy = f"{one['cpu_seconds'] / one['seconds']:.2f} / {two['cpu_seconds'] / two['seconds']:.2f}" if one and two else "–"
        lines.append(f"| {st} | {rss} | {wall} | {speed} | {busy} |")
    proj = res.get("projection") or {}
    if proj.get("hours_by_nodes_x_cores"):
        h = proj["hours_by_nodes_x_cores"]
        lines.append("")
        lines.append(f"Projected `clean` of {proj['gb']:g} GB (fitted on {', '.join(f'{g:g}' for g in proj['fitted_on_gb'])} "
                     f"GB): " + ", ".join(f"{_nodes(k)} {v:g} h" for k, v in h.items()) + ".")
    return "\n".join(lines + [SCALE_END])


def scale_full_block(root: Path) -> str:
    rows = _scale(root)["rows"]
    lines = [SCALE_FULL_BEGIN, "| GB | stage | wall s, 1 / 2 workers | speed-up | CPU s, 1 / 2 | "
             "peak RSS per process MB, 1 / 2 | peak RSS all processes MB, 1 / 2 |", "|---|---|---:|---:|---:|---:|---:|"]
    for gb in sorted({r["gb"] for r in rows}):
        for st in dict.fromkeys(r["stage"] for r in rows):
            one, two = _by(rows, gb, st, 1), _by(rows, gb, st, 2)
            if not (one and two):
                continue
            pair = lambda k: f"{one[k]:g} / {two[k]:g}"  # noqa: E731
            lines.append(f"| {gb:g} | {st} | {pair('seconds')} | {one['seconds'] / two['seconds']:.2f}x | "
                         f"{pair('cpu_seconds')} | {pair('peak_rss_mb')} | {pair('peak_tree_mb')} |")
    return "\n".join(lines + [SCALE_FULL_END])


BLOCKS = ((BEGIN, END, block), (SCALE_BEGIN, SCALE_END, scale_block), (SCALE_FULL_BEGIN, SCALE_FULL_END, scale_full_block))


def render(readme: str, root: Path) -> str:
    """Every generated block the text holds, regenerated (README.md: results + scaling; docs/scaling.md: the full
    scaling table)."""
    for begin, end_marker, make in BLOCKS:
        if begin in readme:
            start, end = readme.index(begin), readme.index(end_marker) + len(end_marker)
            readme = readme[:start] + make(root) + readme[end:]
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's results block is stale")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    stale = 0
    for readme_path in (args.root / "README.md", args.root / "docs" / "scaling.md"):
        if not readme_path.exists():
            continue
        readme = readme_path.read_text(encoding="utf-8")
        new = render(readme, args.root)
        if args.check:
            if new != readme:
                print(f"{readme_path.name}'s generated blocks differ from metrics/ or {SCALE_JSON}: run python "
                      f"scripts/readme_results.py", file=sys.stderr)
                stale = 1
            continue
        readme_path.write_text(new, encoding="utf-8")
    return stale


if __name__ == "__main__":
    sys.exit(main())
