"""The gate's per-source and per-language verdicts on 95% intervals.

Each number the gate acts on comes with the bootstrap interval the eval stage measured (``gain_ci95`` /
``forgetting_ci95``, see ``cpt.evaluation.uncertainty``). Budgets:

- forgetting (old domain, every source and every language): the UPPER bound must be <= ``max_forgetting``;
- gain (new domain, every source and every language): the LOWER bound must be >= ``min_gain``;
- an interval that misses its budget but is wider than the budget itself cannot tell a real regression from too
  little text: "undecided: too little eval text" (score more text: ``eval.max_bytes``), never a silent pass.

The worst verdict decides: any refuse -> refuse, else any undecided -> undecided, else promote.
"""

from __future__ import annotations

from typing import Any

ORDER = {"promote": 0, "undecided": 1, "refuse": 2}


def judge(kind: str, value: float | None, ci: list[float] | None, budget: float) -> dict[str, Any]:
    """One verdict. ``kind`` is "gain" (pass: lo >= budget) or "forgetting" (pass: hi <= budget)."""
    out: dict[str, Any] = {"metric": kind, "value": value, "ci95": ci, "budget": budget}
    if value is None:
        return {**out, "decision": "refuse", "reason": f"no {kind} measured"}
    if ci is None:
        return {**out, "decision": "undecided", "reason": f"undecided: no interval for {kind} {value:+.4f}"}
    lo, hi = ci
    width = hi - lo
    if kind == "gain":
        ok, bound, cmp = lo >= budget, lo, f"lower bound {lo:+.4f} {'>=' if lo >= budget else '<'} min_gain {budget}"
    else:
        ok, bound, cmp = hi <= budget, hi, f"upper bound {hi:+.4f} {'<=' if hi <= budget else '>'} max_forgetting {budget}"
    if ok:
        return {**out, "decision": "promote", "reason": f"{kind} {value:+.4f}: {cmp}"}
    if width > abs(budget):
        return {**out, "decision": "undecided",
                "reason": f"undecided: too little eval text ({kind} {value:+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}] "
                          f"is {width:.4f} wide, wider than its budget {budget})"}
    return {**out, "decision": "refuse", "reason": f"{kind} {value:+.4f}: {cmp}"}


def worst(verdicts: dict[str, dict[str, Any]]) -> str:
    return max((v["decision"] for v in verdicts.values()), key=ORDER.__getitem__, default="refuse")


START, END = "<!-- gate:start -->", "<!-- gate:end -->"


def _ci(ci: list[float] | None) -> str:
    return "n/a" if not ci else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def as_shown(v: dict[str, Any]) -> tuple[float | None, list[float] | None, str]:
    """A verdict in cpt's one sign (gain > 0 learned, forgetting > 0 forgotten) and its budget, as the report shows
    them."""
    if v["metric"] == "gain":
        return v.get("value"), v.get("ci95"), f"lower bound >= {v['budget']:g}"
    return v.get("value"), v.get("ci95"), f"upper bound <= {v['budget']:g}"


def markdown(decision: dict[str, Any]) -> str:
    """The gate's section of reports/eval/report.md (between START and END), in the report's sign convention."""
    th = decision.get("thresholds", {})
    L = [START, "", f"**Decision: {decision['decision']}**" + (" (alias set)" if decision.get("promoted") else "")
         + f" - {decision['reason']}", "",
         "gain > 0 = learned (new-domain rows), forgetting > 0 = forgotten (old-domain rows). Budgets: on every "
         "old-domain source and language the UPPER 95% bound of forgetting must be <= max_forgetting "
         f"({th.get('max_forgetting', 0):g}); on every new-domain source and language the LOWER 95% bound of gain "
         f"must be >= min_gain ({th.get('min_gain', 0):g}). An interval that misses its budget and is wider than "
         "the budget says \"undecided: too little eval text\".", "",
         "| | name | domain | measure | value (bpb) | 95% interval | budget | decision |",
         "|---|---|---|---|---:|---|---|---|"]
    for level, key in (("source", "per_source"), ("language", "per_lang")):
        for name, v in decision.get(key, {}).items():
            value, ci, budget = as_shown(v)
            shown = "n/a" if value is None else f"{value:+.4f}"
            L.append(f"| {level} | {name} | {v.get('domain')} | {v['metric']} | {shown} | {_ci(ci)} | {budget} | "
                     f"{v['decision']} |")
    champ = decision.get("vs_champion", {})
    if champ.get("checked"):
        L += ["", f"Vs champion v{champ.get('version')} ({champ.get('how')}, pooled point estimates): new-domain "
                  f"gain {champ.get('gain'):+.4f}, old-domain forgetting {champ.get('forgetting'):+.4f} bpb -> "
                  f"{'passed' if champ.get('passed') else 'failed'}."]
    else:
        L += ["", "Vs champion: " + "; ".join(champ.get("reasons", ["not checked"])) + "."]
    pooled = decision.get("vs_base", {})
    if pooled.get("gain") is not None and pooled.get("forgetting") is not None:
        L += ["", f"Pooled over all sources of a domain (information only, never decides): new-domain gain "
                  f"{pooled['gain']:+.4f}, old-domain forgetting {pooled['forgetting']:+.4f} bpb."]
    return "\n".join(L + ["", END])


def write_into(report: Any, decision: dict[str, Any]) -> bool:
    """Replace the gate section of ``report`` (a path) in place; False when the report or its markers are absent."""
    from pathlib import Path

    path = Path(report)
    if not path.exists():
        return False
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(head + markdown(decision) + tail, encoding="utf-8")
    return True
