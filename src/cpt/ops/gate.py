"""The promotion gate: does the new model earn the registry alias ``champion``?

Pure decision logic over ``metrics/eval.json`` (no mlflow import): bits per byte are tokenizer-independent, so the
base (old tokenizer) and the continually pretrained model (extended tokenizer) are compared on the same bytes.

    gain        = bpb_new(reference) - bpb_new(candidate)   # bits per byte saved on the new domain (> 0 is good)
    forgetting  = bpb_old(candidate) - bpb_old(reference)   # bits per byte lost on the old domain (> 0 is bad)
    promote     = gain >= gate.min_gain and forgetting <= gate.max_forgetting, vs the base AND vs the champion

Domain bpb is the byte-weighted mean of the per-source bpb (``sum(bpb * bytes) / sum(bytes)``), i.e. total bits over
total bytes, so a big eval set is not outvoted by a small one. A source's domain comes from its eval entry
(``domain``) or else from ``ingest.sources``. Against the champion only the sources scored on the same bytes by
both are compared; when there are none the comparison is skipped and the decision says so.

``run`` is the post-eval hook (``cpt.cli.run_stage`` calls it whenever the eval stage runs): it asks the tracker
(``cpt.ops.tracking``) for the current champion, registers the model, decides, sets the alias and writes
``metrics/gate.json``. With tracking off it still decides vs the base and writes the file.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from cpt.io import write_json
from cpt.params import section, with_defaults

log = logging.getLogger("cpt.ops.gate")

DEFAULTS: dict[str, Any] = {
    "min_gain": 0.02,  # bits per byte the new domain must improve by
    "max_forgetting": 0.05,  # bits per byte the old domain may get worse by
    "champion_min_gain": None,  # vs the current champion; null = min_gain
    "champion_max_forgetting": None,  # vs the current champion; null = max_forgetting
    "alias": "champion",
}

DOMAINS = ("new", "old")


def gate_params(params: dict[str, Any]) -> dict[str, Any]:
    cfg = with_defaults("gate", section(params, "gate"), DEFAULTS)
    for key in ("min_gain", "max_forgetting"):
        cfg[key] = float(cfg[key])
    cfg["champion_min_gain"] = float(cfg["min_gain"] if cfg["champion_min_gain"] is None else cfg["champion_min_gain"])
    cfg["champion_max_forgetting"] = float(
        cfg["max_forgetting"] if cfg["champion_max_forgetting"] is None else cfg["champion_max_forgetting"]
    )
    return cfg


def source_domains(params: dict[str, Any]) -> dict[str, str]:
    """``{source name: "new"|"old"}`` from ``ingest.sources``, plus the eval stage's held-out groups
    (``heldout_<lang>`` takes the domain of that language's training sources; ``heldout_<lang>_<domain>`` says it)."""
    out: dict[str, str] = {}
    by_lang: dict[str, set[str]] = {}
    for src in section(params, "ingest").get("sources") or []:
        if isinstance(src, dict) and src.get("name") and src.get("domain") in DOMAINS:
            out[str(src["name"])] = src["domain"]
            if src.get("lang"):
                by_lang.setdefault(str(src["lang"]), set()).add(src["domain"])
    for lang, domains in by_lang.items():
        if len(domains) == 1:
            out[f"heldout_{lang}"] = next(iter(domains))
        for domain in domains:
            out[f"heldout_{lang}_{domain}"] = domain
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def per_source(eval_metrics: dict[str, Any], model: str, domains: dict[str, str]) -> tuple[dict[str, dict], list[str]]:
    """``{source: {"domain", "bpb", "bytes"}}`` for one model (``base`` or ``cpt``) of metrics/eval.json, and the
    notes on what could not be used (so a missing key is a clear message, never a silent skip)."""
    notes: list[str] = []
    block = eval_metrics.get(model)
    if not isinstance(block, dict) or not block:
        return {}, [f"metrics/eval.json has no per-source '{model}' block (top-level keys: {sorted(eval_metrics)})"]
    out: dict[str, dict] = {}
    for name, entry in sorted(block.items()):
        if not isinstance(entry, dict):
            continue  # a scalar summary next to the sources (e.g. an average), not a source
        bpb, nbytes = _number(entry.get("bpb")), _number(entry.get("bytes"))
        domain = entry.get("domain") if entry.get("domain") in DOMAINS else domains.get(name)
        if bpb is None:
            notes.append(f"{model}/{name}: no finite 'bpb'; not used")
        elif domain is None:
            notes.append(f"{model}/{name}: domain unknown (not in ingest.sources, no 'domain' key); not used")
        else:
            out[name] = {"domain": domain, "bpb": bpb, "bytes": nbytes if nbytes and nbytes > 0 else None}
    return out, notes


def domain_bpb(sources: dict[str, dict], names: set[str] | None = None) -> dict[str, float | None]:
    """Byte-weighted bpb per domain over ``names`` (all sources when None); a plain mean if bytes are missing."""
    out: dict[str, float | None] = {}
    for domain in DOMAINS:
        rows = [s for n, s in sources.items() if s["domain"] == domain and (names is None or n in names)]
        if not rows:
            out[domain] = None
        elif all(r["bytes"] for r in rows):
            out[domain] = sum(r["bpb"] * r["bytes"] for r in rows) / sum(r["bytes"] for r in rows)
        else:
            out[domain] = sum(r["bpb"] for r in rows) / len(rows)
    return out


def compare(candidate: dict[str, float | None], reference: dict[str, float | None], min_gain: float,
            max_forgetting: float) -> dict[str, Any]:
    """One comparison (vs base or vs champion): the two numbers, the thresholds and whether both pass."""
    gain = None if candidate["new"] is None or reference["new"] is None else reference["new"] - candidate["new"]
    forgetting = None if candidate["old"] is None or reference["old"] is None else candidate["old"] - reference["old"]
    reasons = []
    if gain is None:
        reasons.append("no new-domain bpb on both sides")
    elif gain < min_gain:
        reasons.append(f"new-domain gain {gain:.4f} bpb < min_gain {min_gain}")
    if forgetting is None:
        reasons.append("no old-domain bpb on both sides")
    elif forgetting > max_forgetting:
        reasons.append(f"old-domain forgetting {forgetting:.4f} bpb > max_forgetting {max_forgetting}")
    return {
        "gain": gain, "forgetting": forgetting, "min_gain": min_gain, "max_forgetting": max_forgetting,
        "candidate_bpb": candidate, "reference_bpb": reference, "passed": not reasons, "reasons": reasons,
    }


def comparable_sources(candidate: dict[str, dict], champion: dict[str, dict]) -> set[str]:
    """Sources both models were scored on, with the same domain and byte count (same text), so bpb compare."""
    return {
        n for n, s in candidate.items()
        if n in champion and champion[n].get("domain") == s["domain"] and champion[n].get("bytes") == s["bytes"]
    }


def decide(eval_metrics: dict[str, Any], params: dict[str, Any], champion: dict[str, Any] | None = None,
           champion_note: str | None = None) -> dict[str, Any]:
    """The whole decision as a JSON-able dict (written to metrics/gate.json and the MLflow run).

    ``champion``: ``{"version": str, "sources": {name: {"domain", "bpb", "bytes"}}}`` of the current champion, or
    None with ``champion_note`` saying why there is none (no champion yet, tracking off, server unreachable).
    """
    cfg = gate_params(params)
    domains = source_domains(params)
    base, notes_b = per_source(eval_metrics, "base", domains)
    cpt, notes_c = per_source(eval_metrics, "cpt", domains)
    common = set(base) & set(cpt)
    notes = notes_b + notes_c
    notes += [f"{n}: scored for only one of base/cpt; not used" for n in sorted(set(base) ^ set(cpt))]
    vs_base = compare(domain_bpb(cpt, common), domain_bpb(base, common), cfg["min_gain"], cfg["max_forgetting"])
    result: dict[str, Any] = {
        "passed": False,
        "promoted": False,  # passed AND the alias was actually set in the registry
        "alias": cfg["alias"],
        "vs_base": vs_base,
        "sources": {n: {"domain": cpt[n]["domain"], "bytes": cpt[n]["bytes"], "base_bpb": base[n]["bpb"],
                        "cpt_bpb": cpt[n]["bpb"]} for n in sorted(common)},
        "notes": notes,
    }
    for key in ("gain", "forgetting"):  # the eval stage's own per-language view, kept for the reader
        if isinstance(eval_metrics.get(key), dict):
            result[f"eval_{key}"] = eval_metrics[key]
    if champion is None:
        result["vs_champion"] = {"checked": False, "passed": True, "reasons": [champion_note or "no champion yet"]}
    else:
        shared = comparable_sources({n: cpt[n] for n in common}, champion.get("sources") or {})
        if not shared:
            result["vs_champion"] = {
                "checked": False, "passed": True, "version": champion.get("version"),
                "reasons": ["champion was scored on different eval sources/bytes; comparison skipped"],
            }
        else:
            vs = compare(domain_bpb(cpt, shared), domain_bpb(champion["sources"], shared),
                         cfg["champion_min_gain"], cfg["champion_max_forgetting"])
            result["vs_champion"] = {"checked": True, "version": champion.get("version"),
                                     "sources": sorted(shared), **vs}
    result["passed"] = bool(vs_base["passed"] and result["vs_champion"]["passed"])
    reasons = vs_base["reasons"] + (result["vs_champion"]["reasons"] if result["vs_champion"].get("checked") else [])
    result["reason"] = "passed vs base" + (" and champion" if result["vs_champion"].get("checked") else "") \
        if result["passed"] else "; ".join(reasons)
    return result


def candidate_sources(decision: dict[str, Any]) -> dict[str, dict]:
    """What the registry stores with a version so a later gate can compare against it."""
    return {n: {"domain": s["domain"], "bytes": s["bytes"], "bpb": s["cpt_bpb"]} for n, s in decision["sources"].items()}


def summary_metrics(decision: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for the tracker (``gate/...``)."""
    out = {"gate/passed": float(decision["passed"]), "gate/promoted": float(decision["promoted"])}
    for side in ("vs_base", "vs_champion"):
        for key in ("gain", "forgetting"):
            value = decision.get(side, {}).get(key)
            if isinstance(value, (int, float)):
                out[f"gate/{side}/{key}"] = float(value)
    return out


def sources_path(layout: Any) -> Path:
    """data/eval/sources.json: the candidate's per-source bpb (domain, bytes), as the registry keeps it."""
    return Path(layout.data) / "eval" / "sources.json"


def run(params: dict[str, Any], layout: Any, eval_metrics: dict[str, Any], tracker: Any) -> dict[str, Any]:
    """Post-eval hook: champion lookup -> decision -> register -> alias -> metrics/gate.json. Tracking problems are
    recorded in the decision, never raised (the eval results are already safe on disk)."""
    cfg = gate_params(params)
    champion, note, model_name, lookup_failed = None, None, None, False
    if not getattr(tracker, "active", False):
        note = "tracking off: champion comparison skipped, nothing registered"
    else:
        model_name = tracker.model_name
        try:
            champion = tracker.get_alias(model_name, cfg["alias"])
            note = None if champion else f"no '{cfg['alias']}' for registered model '{model_name}' yet"
        except Exception as exc:  # noqa: BLE001 - a down server must not fail eval
            note = f"champion lookup failed ({type(exc).__name__}: {exc}); comparison skipped"
            lookup_failed = True
    decision = decide(eval_metrics, params, champion, note)
    decision["registered_model"] = model_name
    decision["version"] = None
    # The per-source numbers a later gate compares against: an artifact of the registered version (a JSON tag
    # would be ~1 KB of unreadable text in the registry UI), and a DVC output of eval that is NOT in git, so a fresh
    # clone has no copy and `dvc repro` runs eval (and this gate) for the model it just trained.
    sources_file = sources_path(layout)
    write_json(sources_file, candidate_sources(decision), sort_keys=True)
    if getattr(tracker, "active", False):
        try:
            decision["version"] = tracker.register_model(
                layout.model, tags={"cpt.gate.reason": decision["reason"][:5000], "cpt.gate.passed": decision["passed"]},
                artifacts={"gate": sources_file})
        except Exception as exc:  # noqa: BLE001
            decision["notes"].append(f"model registration failed ({type(exc).__name__}: {exc})")
        if decision["passed"] and decision["version"] is None:
            decision["reason"] += "; but no registered version to alias (see notes)"
        elif decision["passed"] and lookup_failed:
            decision["reason"] += "; the champion could not be read, so the alias was left where it is"
        elif decision["passed"]:
            try:
                tracker.set_alias(model_name, cfg["alias"], decision["version"])
                decision["promoted"] = True
            except Exception as exc:  # noqa: BLE001
                decision["reason"] += f"; but setting alias failed ({type(exc).__name__}: {exc})"
    elif decision["passed"]:
        decision["reason"] += "; tracking off, so no alias was set"
    if getattr(tracker, "active", False):
        tracker.log_metrics(summary_metrics(decision))
        tracker.set_tags({"cpt.gate.promoted": decision["promoted"], "cpt.gate.reason": decision["reason"][:5000]})
    write_json(layout.metrics_file("gate"), decision, sort_keys=True)
    tracker.log_artifact(layout.metrics_file("gate"))
    level = logging.INFO if decision["passed"] else logging.WARNING
    verdict = "PROMOTED" if decision["promoted"] else ("passed" if decision["passed"] else "not promoted")
    log.log(level, "gate: %s (%s)", verdict, decision["reason"])
    return decision
