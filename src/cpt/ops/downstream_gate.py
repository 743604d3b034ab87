"""The gate rule ``gate.max_downstream_drop``, applied by the downstream stage after eval's gate has decided.

Why here and not in ``cpt.ops.gate``: the gate runs in the eval process (it needs eval's per-unit records to pair
with the champion), and the downstream stage runs after eval. So the downstream stage RE-JUDGES: its checks (one per
old-language task: the accuracy drop ``base - cpt`` in points, decided on the UPPER bound of its 95% paired
bootstrap interval, ``cpt.ops.verdict.judge``; the worst task decides) join eval's decision, and the worse of the two
is the pipeline's decision (``metrics/downstream.json`` ``gate``, and ``decision`` in metrics/summary.json). When eval
had promoted the candidate (alias ``champion`` set) and the rule does not pass, the alias is moved back: to the
champion eval compared against (``vs_champion.version`` in metrics/gate.json), or removed when there was none, and
the version is tagged ``cpt.downstream.decision``. metrics/gate.json (eval's output) is left as eval wrote it.

Off (null) by default: the tiny demo model is at chance on every task, where a drop says nothing. A profile on a
real pretrained base sets it (e.g. 5 points).
"""

from __future__ import annotations

import logging
from typing import Any

from cpt.ops import verdict
from cpt.ops.gate import gate_params

log = logging.getLogger("cpt.ops.downstream_gate")


def checks(rows: dict[str, dict[str, Any]], max_drop: float | None, old_langs: set[str],
           min_items: int = 2) -> list[dict[str, Any]]:
    """One verdict per old-language task (``rows``: metrics/downstream.json's ``downstream`` table) on its drop in
    points (> 0 = forgotten); empty when the rule is off."""
    if max_drop is None:
        return []
    out = []
    for key, row in rows.items():
        if row.get("lang") not in old_langs:
            continue
        drop = None if row.get("delta") is None else -row["delta"]
        ci = row.get("delta_ci95")
        v = verdict.judge("forgetting", drop, None if ci is None else [-ci[1], -ci[0]], float(max_drop),
                          documents=row.get("n"), min_documents=min_items)
        v["reason"] = v["reason"].replace("max_forgetting", "max_downstream_drop").replace("documents", "items")
        out.append({"check": f"downstream: {key} drop (points)", **v})
    return out


def rejudge(params: dict[str, Any], eval_gate: dict[str, Any], rows: dict[str, dict[str, Any]],
            old_langs: set[str], tracker: Any = None) -> dict[str, Any]:
    """The pipeline's decision after the downstream rule, and the demotion if the rule overturns a promotion."""
    cfg = gate_params(params)
    max_drop = cfg["max_downstream_drop"]
    mine = checks(rows, max_drop, old_langs, min_items=cfg["min_documents"])
    eval_decision = eval_gate.get("decision") or ("promote" if eval_gate.get("passed") else "undecided")
    rule = ("off (gate.max_downstream_drop: null)" if max_drop is None else
            f"every English task's drop, upper 95% bound <= {max_drop:g} points")
    if not mine:
        return {"rule": rule, "max_downstream_drop": max_drop, "checks": [], "eval_decision": eval_decision,
                "decision": eval_decision, "reason": "the rule adds no check", "demoted": False}
    own = verdict.worst({str(i): c for i, c in enumerate(mine)})
    decision = max(eval_decision, own, key=verdict.ORDER.__getitem__)
    failed = [f"{c['check']}: {c['reason']}" for c in mine if c["decision"] == own and own != "promote"]
    out = {"rule": rule, "max_downstream_drop": max_drop, "checks": mine, "eval_decision": eval_decision,
           "downstream_decision": own, "decision": decision,
           "reason": "; ".join(failed) if failed else "every English task within the budget", "demoted": False}
    if eval_gate.get("promoted") and decision != "promote":
        out.update(demote(eval_gate, tracker, decision))
    return out


def demote(eval_gate: dict[str, Any], tracker: Any, decision: str) -> dict[str, Any]:
    """Move the alias eval set back (to the champion it replaced, else remove it); never raises."""
    name, alias, version = eval_gate.get("registered_model"), eval_gate.get("alias", "champion"), eval_gate.get("version")
    previous = (eval_gate.get("vs_champion") or {}).get("version")
    if not getattr(tracker, "active", False) or not name:
        return {"demoted": False, "demote_note": "tracking off: no alias to move"}
    try:
        if previous:
            tracker.set_alias(name, alias, str(previous))
        else:
            tracker.delete_alias(name, alias)
        tracker.set_tags({"cpt.downstream.decision": decision, "cpt.downstream.demoted_version": str(version)})
    except Exception as exc:  # noqa: BLE001 - a down server must not fail the stage; the decision is on disk
        return {"demoted": False, "demote_note": f"moving alias '{alias}' failed ({type(exc).__name__}: {exc})"}
    log.warning("downstream rule: %s; alias '%s' of %s moved %s", decision, alias, name,
                f"back to v{previous}" if previous else "off (no earlier champion)")
    return {"demoted": True, "alias_now": str(previous) if previous else None}
