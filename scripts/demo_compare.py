"""How a fresh `make demo` compares with the committed results: inside their 95% intervals? the same decisions?

    python scripts/demo_compare.py            # against git HEAD (what `make demo` prints at its end)
    python scripts/demo_compare.py --rev v0.3 # against another commit

Why this exists: the demo's tiny base is pretrained from scratch on the machine that runs it, and float reductions
differ between CPUs (kernel choice, summation order), so another machine starts continual pretraining from a
slightly different base and every number moves a little (the first loss is identical; English forgetting moved
0.014 -> 0.024 on one fresh clone). Bit-identical across x86 CPUs is not promised; what is promised is that the
result means the same: each fresh number is read against the committed number's 95% bootstrap interval, and the
gate's decisions are compared. Reruns on one machine are bit-identical (dvc.lock hashes do not change).

One sign convention, as everywhere in cpt: gain > 0 learned, forgetting > 0 forgotten (bits per byte).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FILES = ("eval", "gate", "sft")


def committed(root: Path, rev: str, name: str) -> dict[str, Any] | None:
    """metrics/<name>.json as committed at ``rev`` (None outside git, or when it is not there)."""
    try:
        out = subprocess.run(["git", "show", f"{rev}:metrics/{name}.json"], cwd=root, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout)
    except ValueError:
        return None


def fresh(root: Path, name: str) -> dict[str, Any] | None:
    path = root / "metrics" / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def numbers(ev: dict[str, Any], gate: dict[str, Any], sft: dict[str, Any]) -> dict[str, tuple[float, list | None]]:
    """``{label: (value, ci95)}``: per-language gain / forgetting, the gate's per-source figures, sft's."""
    out: dict[str, tuple[float, list | None]] = {}
    for kind in ("gain", "forgetting"):
        for lang, v in sorted((ev.get(kind) or {}).items()):
            out[f"{kind} {lang}"] = (v, (ev.get(f"{kind}_ci95") or {}).get(lang))
    for name, v in sorted((gate.get("per_source") or {}).items()):
        if isinstance(v, dict) and isinstance(v.get("value"), (int, float)):
            out[f"{v.get('metric')} {name}"] = (v["value"], v.get("ci95"))
    for kind in ("gain", "forgetting"):
        for lang, v in sorted((sft.get(kind) or {}).items()):
            out[f"sft {kind} {lang}"] = (v, (sft.get(f"{kind}_ci95") or {}).get(lang))
    return out


def decisions(gate: dict[str, Any], sft: dict[str, Any]) -> dict[str, str | None]:
    return {"promotion gate": gate.get("decision"), "sft promotion gate": (sft.get("gate") or {}).get("decision")}


def _fmt(v: float) -> str:
    return f"{v:+.3f}" if abs(v) < 1 else f"{v:+.2f}"


def compare(old: dict[str, dict], new: dict[str, dict]) -> tuple[list[str], dict[str, int]]:
    """Markdown lines of the comparison, and counts (``inside`` of ``numbers`` with an interval, ``same_numbers`` of
    ``compared``, ``same_decisions`` of ``decisions``)."""
    a = numbers(old.get("eval") or {}, old.get("gate") or {}, old.get("sft") or {})
    b = numbers(new.get("eval") or {}, new.get("gate") or {}, new.get("sft") or {})
    lines = ["| number (bpb) | committed [95% interval] | fresh | inside? |", "|---|---|---:|---|"]
    counts = {"inside": 0, "numbers": 0, "same_decisions": 0, "decisions": 0, "same_numbers": 0, "compared": 0}
    for label in [k for k in a if k in b]:
        (v0, ci), (v1, _) = a[label], b[label]
        counts["compared"] += 1
        counts["same_numbers"] += v0 == v1
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            inside = ci[0] <= v1 <= ci[1]
            counts["numbers"] += 1
            counts["inside"] += inside
            shown, verdict = f"{_fmt(v0)} [{_fmt(ci[0])}, {_fmt(ci[1])}]", "yes" if inside else "**no**"
        else:
            shown, verdict = _fmt(v0), "(no interval)"
        lines.append(f"| {label} | {shown} | {_fmt(v1)} | {verdict} |")
    da = decisions(old.get("gate") or {}, old.get("sft") or {})
    db = decisions(new.get("gate") or {}, new.get("sft") or {})
    lines += ["", "| decision | committed | fresh | same? |", "|---|---|---|---|"]
    for label, d0 in da.items():
        if d0 is None or db.get(label) is None:
            continue
        counts["decisions"] += 1
        counts["same_decisions"] += d0 == db[label]
        lines.append(f"| {label} | {d0} | {db[label]} | {'yes' if d0 == db[label] else '**no**'} |")
    return lines, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="the commit whose metrics/ to compare with (default HEAD)")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    old = {n: committed(args.root, args.rev, n) for n in FILES}
    new = {n: fresh(args.root, n) for n in FILES}
    if not old["eval"] or not new["eval"]:
        print(f"demo_compare: nothing to compare (metrics/eval.json {'not committed at ' + args.rev if not old['eval'] else 'not written yet'})")
        return 0
    if old == new:
        print(f"This run reproduced the results committed at {args.rev} exactly (metrics/eval.json, gate.json, "
              "sft.json are identical).")
        return 0
    lines, c = compare(old, new)
    if c["same_numbers"] == c["compared"] and c["same_decisions"] == c["decisions"]:
        print(f"This run reproduced every number and decision committed at {args.rev} ({c['compared']} numbers, "
              f"{c['decisions']} decisions; the files differ only in other fields: `git diff metrics/`).")
        return 0
    print(f"This run's results differ from those committed at {args.rev} (expected on another CPU: the tiny base is "
          "pretrained here, and float reductions differ between CPUs). Each fresh number against the committed one's "
          "95% interval:\n")
    print("\n".join(lines))
    print(f"\n{c['inside']} of {c['numbers']} fresh numbers are inside the committed 95% intervals; "
          f"{c['same_decisions']} of {c['decisions']} gate decisions are the same (`git diff metrics/` shows every "
          "change).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
