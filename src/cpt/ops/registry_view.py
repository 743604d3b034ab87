"""What the model registry shows for a version the gate registered (``cpt`` and ``cpt-sft`` alike).

The registry's version list cuts a description after about a hundred characters, so the description leads with the
decision and what decided it, then the budgets, then the numbers: "refuse: heldout_en forgetting +0.082 (95%
interval [+0.077, +0.087]) > 0.05 | budgets: min_gain 0.02, max_forgetting 0.05 | gain: ja +15.2, ... | forgetting: en +0.014".
The budgets are also tags of the version (``cpt.gate.min_gain`` ...), so a version passed under a looser budget can
be told from the others in the list and found with a filter. Numbers in cpt's one sign: gain > 0 learned,
forgetting > 0 forgotten, bits per byte. Rendering only: the decision is ``cpt.ops.gate``'s.
"""

from __future__ import annotations

import logging
from typing import Any

from cpt.ops.summary import _digits, _signed, deciding

log = logging.getLogger("cpt.ops.gate")

ALWAYS = ("min_gain", "max_forgetting", "min_documents")
CHAMPION = ("champion_min_gain", "champion_max_forgetting")


def budgets(decision: dict[str, Any]) -> str:
    """``min_gain 0.02, max_forgetting 0.05`` (+ the champion's when they differ)."""
    th = decision.get("thresholds") or {}
    keys = [k for k in ALWAYS if th.get(k) is not None]
    keys += [k for k in CHAMPION if th.get(k) is not None and th.get(k) != th.get(k.replace("champion_", ""))]
    return ", ".join(f"{k} {th[k]:g}" for k in keys)


def numbers(decision: dict[str, Any]) -> str:
    """``gain: vi +8.2 | forgetting: en +0.014`` from the per-language verdicts."""
    out = []
    for kind in ("gain", "forgetting"):
        vals = [(k.rsplit("_", 1)[0] if k.endswith(("_new", "_old")) else k, v["value"])
                for k, v in sorted((decision.get("per_lang") or {}).items())
                if isinstance(v, dict) and v.get("metric") == kind and isinstance(v.get("value"), (int, float))]
        if vals:
            out.append(f"{kind}: " + ", ".join(f"{lang} {_signed(v, _digits(v))}" for lang, v in vals))
    return " | ".join(out)


def description(decision: dict[str, Any]) -> str:
    """Decision and reason first, then budgets, then numbers (bits per byte)."""
    d = decision.get("decision") or ("promote" if decision.get("passed") else "refuse")
    if d == "promote":
        champ = decision.get("vs_champion") or {}
        head = ("promote" + (f" (alias {decision.get('alias', 'champion')})" if decision.get("promoted") else
                             " (alias not set: see the gate reason)")
                + ": every source and language within budget"
                + (f" and better than champion v{champ.get('version')}" if champ.get("checked") else ""))
    else:
        why = deciding(decision) or str(decision.get("reason") or "").split(": ", 1)[-1]
        head = f"{d}: {why}"
    parts = [head, f"budgets: {budgets(decision)}" if budgets(decision) else "", numbers(decision) + " bpb"]
    return " | ".join(p for p in parts if p and p != " bpb")


def tags(decision: dict[str, Any]) -> dict[str, str]:
    """The version's decision and budgets as tags, decision first (the registry lists a version's tags in the order
    they were set, in a narrow column): ``cpt.gate.decision``, ``cpt.gate.min_gain``, ``cpt.gate.max_forgetting``,
    and the champion budgets when they differ from those."""
    th = decision.get("thresholds") or {}
    out = {"cpt.gate.decision": str(decision.get("decision"))}
    out.update({f"cpt.gate.{k}": f"{th[k]:g}" for k in ALWAYS if th.get(k) is not None})
    out.update({f"cpt.gate.{k}": f"{th[k]:g}" for k in CHAMPION
                if th.get(k) is not None and th.get(k) != th.get(k.replace("champion_", ""))})
    return out


def describe(tracker: Any, decision: dict[str, Any]) -> None:
    """Describe and tag the version the gate just registered; a registry problem is logged, never raised."""
    version, name = decision.get("version"), decision.get("registered_model")
    if not version or not getattr(tracker, "active", False):
        return
    try:
        tracker.describe_version(str(version), description(decision), name=name, tags=tags(decision))
    except Exception as exc:  # noqa: BLE001 - a description must never fail a stage
        log.warning("could not describe %s version %s: %s", name, version, exc)
