"""The gate's verdicts on 95% intervals: three outcomes, one rule, for every check.

Each number the gate acts on comes with the bootstrap interval the eval stage measured (``gain_ci95`` /
``forgetting_ci95``: a paired bootstrap over whole documents, ``cpt.evaluation.uncertainty``). Budgets:
``min_gain`` (gain, new domain: more is better) and ``max_forgetting`` (forgetting, old domain: less is better).

- **promote**: the bound that matters clears its budget (gain's LOWER bound >= min_gain; forgetting's UPPER bound
  <= max_forgetting);
- **refuse**: the whole interval lies on the wrong side (gain's UPPER bound < min_gain: even the best case gains too
  little; forgetting's LOWER bound > max_forgetting: even the best case forgets too much);
- **undecided**: the interval straddles the budget: more eval text (more documents) would decide;
- **undecided: too few documents** when the measurement rests on fewer than ``gate.min_documents`` documents (its
  interval, however narrow, would claim what a handful of documents cannot show), and "no interval" when there is
  none. A missing number is a refuse.

The interval's width no longer matters: a clear failure ([+0.3, +0.5] of forgetting against 0.05) is refused, not
"too little eval text". ``worst``: any refuse -> refuse, else any undecided -> undecided, else promote. A check is
any dict with ``decision`` and ``reason``, so new rules (a downstream-task drop, ...) join the same list.
"""

from __future__ import annotations

from typing import Any

ORDER = {"promote": 0, "undecided": 1, "refuse": 2}


def judge(kind: str, value: float | None, ci: list[float] | None, budget: float, *,
          documents: int | None = None, min_documents: int = 0) -> dict[str, Any]:
    """One verdict. ``kind`` is "gain" (budget = the least acceptable value) or "forgetting" (the most acceptable).
    ``documents``: how many documents the interval was resampled over (None: unknown, not checked)."""
    out: dict[str, Any] = {"metric": kind, "value": value, "ci95": ci, "budget": budget}
    if documents is not None:
        out["documents"] = documents
    if value is None:
        return {**out, "decision": "refuse", "reason": f"no {kind} measured"}
    if documents is not None and documents < min_documents:
        return {**out, "decision": "undecided",
                "reason": f"undecided: too few documents ({kind} {value:+.4f} rests on {documents} document"
                          f"{'s' if documents != 1 else ''}, fewer than gate.min_documents {min_documents})"}
    if ci is None:
        return {**out, "decision": "undecided", "reason": f"undecided: no interval for {kind} {value:+.4f}"}
    lo, hi = ci
    shown = f"{kind} {value:+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}]"
    if kind == "gain":
        if lo >= budget:
            return {**out, "decision": "promote", "reason": f"{shown}: lower bound >= min_gain {budget}"}
        if hi < budget:
            return {**out, "decision": "refuse", "reason": f"{shown}: wholly below min_gain {budget}"}
        return {**out, "decision": "undecided", "reason": f"undecided: {shown} straddles min_gain {budget}"}
    if hi <= budget:
        return {**out, "decision": "promote", "reason": f"{shown}: upper bound <= max_forgetting {budget}"}
    if lo > budget:
        return {**out, "decision": "refuse", "reason": f"{shown}: wholly above max_forgetting {budget}"}
    return {**out, "decision": "undecided", "reason": f"undecided: {shown} straddles max_forgetting {budget}"}


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


def _rows(level: str, verdicts: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for name, v in verdicts.items():
        value, ci, budget = as_shown(v)
        shown = "n/a" if value is None else f"{value:+.4f}"
        docs = v.get("documents", "n/a")
        out.append(f"| {level} | {name} | {v.get('domain')} | {v['metric']} | {shown} | {_ci(ci)} | {docs} "
                   f"| {budget} | {v['decision']} |")
    return out


def markdown(decision: dict[str, Any]) -> str:
    """The gate's section of reports/eval/report.md (between START and END), in the report's sign convention."""
    th = decision.get("thresholds", {})
    head = ["| | name | domain | measure | value (bpb) | 95% interval | documents | budget | decision |",
            "|---|---|---|---|---:|---|---:|---|---|"]
    L = [START, "", f"**Decision: {decision['decision']}**" + (" (alias set)" if decision.get("promoted") else "")
         + f" - {decision['reason']}", "",
         "gain > 0 = learned (new-domain rows), forgetting > 0 = forgotten (old-domain rows); intervals resample "
         "whole documents. Budgets: on every old-domain source and language the UPPER 95% bound of forgetting must "
         f"be <= max_forgetting ({th.get('max_forgetting', 0):g}); on every new-domain source and language the LOWER "
         f"95% bound of gain must be >= min_gain ({th.get('min_gain', 0):g}). Wholly on the wrong side: refuse; "
         f"straddling the budget, or fewer than {th.get('min_documents', '?')} documents (gate.min_documents): "
         "undecided.", "",
         "Vs the base:", "", *head]
    for level, key in (("source", "per_source"), ("language", "per_lang")):
        L += _rows(level, decision.get(key, {}))
    champ = decision.get("vs_champion", {})
    if champ.get("checked"):
        L += ["", f"Vs champion v{champ.get('version')} ({champ.get('how')}; budgets: min_gain "
                  f"{champ.get('min_gain'):g}, max_forgetting {champ.get('max_forgetting'):g}) -> "
                  f"{champ.get('decision')}:", "", *head]
        for level, key in (("source", "per_source"), ("language", "per_lang")):
            L += _rows(level, champ.get(key, {}))
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
