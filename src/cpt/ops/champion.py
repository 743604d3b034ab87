"""The gate against the current champion: paired on the same units, source by source and language by language.

A candidate replaces the champion only if it is at least as good on every source and every language, judged with
the same three-outcome rule (``cpt.ops.verdict``) and the same kind of interval as against the base: the paired
document bootstrap of ``cpt.evaluation.uncertainty.compare`` on the two models' per-unit NLL. One pooled number per
domain let a candidate 1.0 bpb worse than the champion on Vietnamese through because it gained on Chinese.

Same units: the champion's stored record (``cpt.evaluation.record``, registered with its version) is used when
every source's content hash equals the candidate's (same units, same scoring configuration); otherwise the champion
is downloaded, re-scored on the candidate's units by the caller's ``rescore`` and the copy is deleted afterwards
(a 7B model is ~14 GB per eval). When neither works the comparison is "not checked" and the gate refuses.

Signs as against the base, with the champion as the reference: gain = bpb(champion) - bpb(candidate) on new-domain
sources (>= ``champion_min_gain``), forgetting = bpb(candidate) - bpb(champion) on old-domain sources
(<= ``champion_max_forgetting``).
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable

from cpt.evaluation.record import matches
from cpt.evaluation.uncertainty import compare, negate
from cpt.ops import verdict

log = logging.getLogger("cpt.ops.gate")

LN2 = math.log(2.0)


def discard(path: Path | None) -> None:
    """Delete a downloaded champion copy: the folder ``download_model`` returned and the temporary folder it made
    for it (``cpt-champion-*``); a tracker's ``download_model`` hands the caller a copy it owns."""
    if path is None:
        return
    path = Path(path)
    top = path.parent if path.parent.name.startswith("cpt-champion-") else path
    shutil.rmtree(top, ignore_errors=True)


def rescore(champion: dict[str, Any], tracker: Any, rescorer: Callable[[Path], dict] | None
            ) -> tuple[dict | None, str | None]:
    """The champion's record on the candidate's units (download -> ``rescorer`` -> delete), or (None, why not)."""
    if rescorer is None:
        return None, "no re-scorer given"
    path = None
    try:
        path = tracker.download_model(champion)
        if path is None:
            return None, "the registry holds no model files for it"
        return rescorer(Path(path)), None
    except Exception as exc:  # noqa: BLE001 - a registry or scoring problem is a reason to refuse, not a crash
        return None, f"re-scoring it failed ({type(exc).__name__}: {exc})"
    finally:
        discard(path)


def _paired(candidate: dict[str, dict], reference: dict[str, dict]) -> tuple[dict[str, list], list[str]]:
    """Per-unit table for ``compare``: the champion's NLL as reference, the candidate's as candidate, on the
    candidate's bytes. Where a unit's bytes differ (an sft chat template that renders the assistant turn with
    other spacing), the champion's NLL is scaled to the candidate's bytes at its own bits per byte, and noted."""
    t: dict[str, list] = {"ref": [], "cand": [], "bytes": [], "doc": [], "source": []}
    notes = []
    for name, mine in sorted(candidate.items()):
        cu, ru = mine["units"], reference[name]["units"]
        differ = 0
        for nll, b, rnll, rb, doc in zip(cu["nll"], cu["bytes"], ru["nll"], ru["bytes"], cu["doc"]):
            if rb != b:
                differ += 1
                rnll = rnll * b / rb if rb else float("nan")
            t["ref"].append(rnll)
            t["cand"].append(nll)
            t["bytes"].append(b)
            t["doc"].append(doc if not isinstance(doc, list) else tuple(doc))
            t["source"].append(name)
        if differ:
            notes.append(f"{name}: {differ} units have other byte counts for the champion; its NLL was scaled to "
                         "the candidate's bytes")
    return t, notes


def judge(candidate: dict[str, dict], reference: dict[str, dict], cfg: dict[str, Any], *, resamples: int,
          seed: int) -> dict[str, Any]:
    """Per-source and per-language verdicts of the candidate against the champion's ``reference`` record."""
    t, notes = _paired(candidate, reference)
    pools: dict[str, list[str]] = {}
    for name, s in sorted(candidate.items()):
        pools.setdefault(f"{'gain' if s['domain'] == 'new' else 'forgetting'}:{s['lang']}", []).append(name)
    cmp = compare(t["ref"], t["cand"], t["bytes"], t["doc"], t["source"],
                  lang={n: s["lang"] for n, s in candidate.items()}, pools=pools, resamples=resamples, seed=seed)

    def one(kind: str, row: dict) -> dict[str, Any]:
        budget = cfg["champion_min_gain"] if kind == "gain" else cfg["champion_max_forgetting"]
        value = row["delta"] if kind == "gain" or row["delta"] is None else -row["delta"]
        ci = row["ci95"] if kind == "gain" else negate(row["ci95"])
        return {**verdict.judge(kind, value, ci, budget, documents=row["documents"],
                                min_documents=cfg["min_documents"]),
                "champion_bpb": row["ref_bpb"], "cpt_bpb": row["cand_bpb"]}

    per_source = {}
    for name, row in cmp["sources"].items():
        kind = "gain" if candidate[name]["domain"] == "new" else "forgetting"
        per_source[name] = {"domain": candidate[name]["domain"], "lang": row["lang"], "bytes": row["bytes"],
                            **one(kind, row)}
    per_lang = {}
    for key, row in sorted(cmp["pools"].items()):
        kind, lang = key.split(":", 1)
        name = lang if lang not in per_lang else f"{lang}_{'new' if kind == 'gain' else 'old'}"
        per_lang[name] = {"domain": "new" if kind == "gain" else "old", **one(kind, row)}
    pooled = {}
    for kind, domain in (("gain", "new"), ("forgetting", "old")):
        idx = [i for i, n in enumerate(t["source"]) if candidate[n]["domain"] == domain]
        nbytes = sum(t["bytes"][i] for i in idx)
        delta = sum(t["ref"][i] - t["cand"][i] for i in idx) / (LN2 * nbytes) if nbytes else None
        pooled[kind] = None if delta is None else (delta if kind == "gain" else -delta)
    return {"per_source": per_source, "per_lang": per_lang, "bootstrap": cmp["bootstrap"], "notes": notes,
            **pooled}


def vs_champion(candidate: dict[str, dict] | None, champion: dict[str, Any] | None, note: str | None,
                rescored: dict[str, dict] | None, cfg: dict[str, Any], *, resamples: int,
                seed: int) -> dict[str, Any]:
    """The ``vs_champion`` block of metrics/gate.json: ``checked``, ``version``, ``how``, ``per_source``,
    ``per_lang`` (verdicts as against the base), ``decision``, ``passed``, ``reasons``, pooled ``gain`` /
    ``forgetting`` (information only) and the budgets."""
    if champion is None:
        return {"checked": False, "passed": True, "decision": "promote", "reasons": [note or "no champion yet"]}
    version = champion.get("version")
    budgets = {"min_gain": cfg["champion_min_gain"], "max_forgetting": cfg["champion_max_forgetting"]}
    ok, why = matches(candidate or {}, champion.get("sources"))
    if ok:
        ref, how = champion["sources"], "its stored per-unit scores (same units and eval configuration)"
    else:
        ok, why_rescored = matches(candidate or {}, rescored)
        ref, how = rescored, "re-scored on this eval set"
        if not ok:
            why = note or (why_rescored if rescored is not None else f"stored scores: {why}; not re-scored")
            return {"checked": False, "passed": False, "decision": "refuse", "version": version, **budgets,
                    "reasons": [f"champion v{version} cannot be compared on this eval set ({why}); refusing to "
                                "promote unchecked"]}
    assert candidate is not None and ref is not None
    out = judge(candidate, ref, cfg, resamples=resamples, seed=seed)
    items = {**{f"source {k}": v for k, v in out["per_source"].items()},
             **{f"lang {k}": v for k, v in out["per_lang"].items()}}
    decision = verdict.worst(items)
    return {"checked": True, "version": version, "how": how, "sources": sorted(candidate), **budgets, **out,
            "decision": decision, "passed": decision == "promote",
            "reasons": [f"{n}: {v['reason']}" for n, v in items.items() if v["decision"] != "promote"]}
