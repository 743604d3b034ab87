"""The README's results table, generated from the committed demo outputs (metrics/*.json), never typed by hand.

    python scripts/readme_results.py          # rewrite the block between the README's results markers
    python scripts/readme_results.py --check  # exit 1 if the README's block differs (tests/test_readme.py runs it)

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
    if sft:
        out.append(("sft: held-out assistant-token gain vs the cpt model", _per_lang(sft.get("gain"), sft.get("gain_ci95"), 3),
                    "`metrics/sft.json`"))
        out.append(("sft: plain-text forgetting vs the cpt model",
                    _per_lang(sft.get("forgetting"), sft.get("forgetting_ci95"), 3), "`metrics/sft.json`"))
        if (sft.get("gate") or {}).get("decision"):
            out.append(("sft: promotion gate", f"**{sft['gate']['decision']}**", "`metrics/sft.json`"))
    return out


def block(root: Path) -> str:
    lines = [BEGIN, "| what | demo (tiny base, CPU) | where |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows(root)]
    return "\n".join(lines + [END])


def render(readme: str, root: Path) -> str:
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[:start] + block(root) + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's results block is stale")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    readme_path = args.root / "README.md"
    readme = readme_path.read_text(encoding="utf-8")
    new = render(readme, args.root)
    if args.check:
        if new != readme:
            print("README.md's results block differs from metrics/: run python scripts/readme_results.py", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
