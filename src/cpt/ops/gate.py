"""The promotion gate: does the new model earn the registry alias ``champion``?

Decision logic over ``metrics/eval.json`` (no mlflow import): bits per byte are tokenizer-independent, so the base
(old tokenizer) and the continually pretrained model (extended tokenizer) are compared on the same bytes. Sign
convention of eval.json: ``gain = bpb(base) - bpb(cpt)`` on new-domain text and ``forgetting = bpb(cpt) - bpb(base)``
on old-domain text, each with its bootstrap 95% interval (``gain_ci95`` / ``forgetting_ci95``: whole documents
resampled, ``cpt.evaluation.uncertainty``) and the number of ``documents`` behind it.

The decision is a list of checks (``checks`` in metrics/gate.json), each one verdict of ``cpt.ops.verdict.judge``
(promote | refuse | undecided, with its reason); the worst decides. Today's checks:

- vs the base, every source and every language: forgetting (old domain) within ``gate.max_forgetting``, gain (new
  domain) at least ``gate.min_gain``; fewer than ``gate.min_documents`` documents: "undecided: too few documents";
- vs the current champion, the same per-source and per-language checks (``cpt.ops.champion``: paired on the same
  units, the champion re-scored when its stored record is on other units or another eval configuration, by content
  hash) with ``champion_min_gain`` / ``champion_max_forgetting``. A champion that cannot be compared is a refuse:
  the gate never promotes unchecked.

A new rule (a downstream-task drop, ...) adds its verdicts to ``checks`` in ``decide``. The byte-weighted pooled
figures (``vs_base``) are kept as information.

``decision``: "promote" | "refuse" | "undecided"; ``reason`` names what decided it (every check whose verdict is
the decision: the refusals of a refuse, the undecided checks of an undecided; all of them are in ``checks``). ``run`` is the post-eval hook (``cpt.cli.run_stage`` calls it whenever the eval stage runs): champion
lookup (and re-score) -> decision -> register -> alias -> metrics/gate.json. With tracking off it still decides vs
the base and writes the file.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from cpt.errors import ConfigError
from cpt.evaluation import record
from cpt.io import read_json, write_json
from cpt.ops import champion as champ_mod
from cpt.ops import registry_view, verdict
from cpt.params import section, with_defaults

log = logging.getLogger("cpt.ops.gate")

DEFAULTS: dict[str, Any] = {
    "min_gain": 0.02,  # bits per byte the new domain must improve by
    "max_forgetting": 0.05,  # bits per byte the old domain may get worse by
    "champion_min_gain": None,  # vs the current champion; null = min_gain
    "champion_max_forgetting": None,  # vs the current champion; null = max_forgetting
    "min_documents": 5,  # fewer documents behind a gated number: "undecided: too few documents"
    "alias": "champion",
    # points of accuracy an English downstream task may drop (upper 95% bound, worst task); null = off. Applied by
    # the downstream stage after eval (cpt.ops.downstream_gate, docs/downstream.md)
    "max_downstream_drop": None,
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
    if cfg["max_downstream_drop"] is not None:
        if isinstance(cfg["max_downstream_drop"], bool) or not isinstance(cfg["max_downstream_drop"], (int, float)):
            raise ConfigError(f"gate.max_downstream_drop: expected points (a number) or null, "
                              f"got {cfg['max_downstream_drop']!r}")
        cfg["max_downstream_drop"] = float(cfg["max_downstream_drop"])
    if isinstance(cfg["min_documents"], bool) or not isinstance(cfg["min_documents"], int) or cfg["min_documents"] < 1:
        raise ConfigError(f"gate.min_documents: expected a positive integer, got {cfg['min_documents']!r}")
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


def verdicts(eval_metrics: dict[str, Any], cpt: dict[str, dict], base: dict[str, dict],
             cfg: dict[str, Any]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(per_source, per_lang) verdicts vs the base, on eval.json's intervals."""
    info = eval_metrics.get("sources") if isinstance(eval_metrics.get("sources"), dict) else {}
    per_src: dict[str, dict] = {}
    for name in sorted(set(cpt) & set(base)):
        domain = cpt[name]["domain"]
        kind, budget = ("gain", cfg["min_gain"]) if domain == "new" else ("forgetting", cfg["max_forgetting"])
        value = base[name]["bpb"] - cpt[name]["bpb"] if kind == "gain" else cpt[name]["bpb"] - base[name]["bpb"]
        entry = info.get(name) or {}
        per_src[name] = {"domain": domain, "lang": entry.get("lang"), "bytes": cpt[name]["bytes"],
                         **verdict.judge(kind, value, entry.get(f"{kind}_ci95"), budget,
                                         documents=_documents(entry), min_documents=cfg["min_documents"])}
    per_lang: dict[str, dict] = {}
    for kind, domain, budget in (("gain", "new", cfg["min_gain"]), ("forgetting", "old", cfg["max_forgetting"])):
        values = eval_metrics.get(kind) if isinstance(eval_metrics.get(kind), dict) else {}
        cis = eval_metrics.get(f"{kind}_ci95") if isinstance(eval_metrics.get(f"{kind}_ci95"), dict) else {}
        for lang, value in sorted(values.items()):
            key = lang if lang not in per_lang else f"{lang}_{domain}"
            mine = [e for e in info.values() if isinstance(e, dict) and e.get("lang") == lang
                    and e.get("domain", domain) == domain]
            docs = [_documents(e) for e in mine]
            n_docs = sum(docs) if mine and None not in docs else None  # type: ignore[arg-type]
            per_lang[key] = {"domain": domain, **verdict.judge(kind, _number(value), cis.get(lang), budget,
                                                               documents=n_docs, min_documents=cfg["min_documents"])}
    return per_src, per_lang


def _documents(entry: dict[str, Any]) -> int | None:
    """eval.json's ``sources.<name>.documents`` (None in an eval.json from before documents were counted)."""
    n = entry.get("documents")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def decide(eval_metrics: dict[str, Any], params: dict[str, Any], champion: dict[str, Any] | None = None,
           champion_note: str | None = None, champion_scores: dict[str, dict] | None = None,
           candidate: dict[str, dict] | None = None) -> dict[str, Any]:
    """The whole decision as a JSON-able dict (written to metrics/gate.json and the MLflow run).

    ``champion``: ``{"version": str, "sources": its stored record}`` of the current champion, or None with
    ``champion_note`` saying why there is none. ``candidate``: the candidate's record (``cpt.evaluation.record``:
    per-unit NLL, content hashes); ``champion_scores``: the champion re-scored on the candidate's units (a record
    too), for when the stored one does not match.
    """
    cfg = gate_params(params)
    domains = source_domains(params)
    base, notes_b = per_source(eval_metrics, "base", domains)
    cpt, notes_c = per_source(eval_metrics, "cpt", domains)
    common = set(base) & set(cpt)
    notes = notes_b + notes_c
    notes += [f"{n}: scored for only one of base/cpt; not used" for n in sorted(set(base) ^ set(cpt))]
    by_source, by_lang = verdicts(eval_metrics, {n: cpt[n] for n in common}, base, cfg)
    pooled = compare(domain_bpb(cpt, common), domain_bpb(base, common), cfg["min_gain"], cfg["max_forgetting"])
    boot = eval_metrics.get("bootstrap") if isinstance(eval_metrics.get("bootstrap"), dict) else {}
    champ = champ_mod.vs_champion(candidate, champion, champion_note, champion_scores, cfg,
                                  resamples=int(boot.get("resamples") or 1000),
                                  seed=int(boot.get("seed") if boot.get("seed") is not None else params.get("seed", 0)))
    notes += champ.get("notes", [])
    checks = [{"check": f"vs base: source {k}", **v} for k, v in by_source.items()]
    checks += [{"check": f"vs base: lang {k}", **v} for k, v in by_lang.items()]
    checks += [{"check": f"vs champion v{champ.get('version')}: source {k}", **v}
               for k, v in champ.get("per_source", {}).items()]
    checks += [{"check": f"vs champion v{champ.get('version')}: lang {k}", **v}
               for k, v in champ.get("per_lang", {}).items()]
    if not by_source:
        checks.append({"check": "vs base", "decision": "refuse", "reason": "no source scored by both base and cpt"})
    if champion is not None and not champ.get("checked"):
        checks += [{"check": f"vs champion v{champ.get('version')}", "decision": "refuse", "reason": r}
                   for r in champ["reasons"]]
    decision = verdict.worst({str(i): c for i, c in enumerate(checks)})
    # the reason names what decided it: the refusals when refused (undecided checks stay in ``checks``)
    failed = [f"{c['check']}: {c['reason']}" for c in checks if c["decision"] == decision]
    result: dict[str, Any] = {
        "decision": decision,
        "passed": decision == "promote",
        "promoted": False,  # passed AND the alias was actually set in the registry
        "reason": ("passed vs base" + (" and champion" if champ.get("checked") else "")) if decision == "promote"
        else f"{decision}: " + "; ".join(failed),
        "alias": cfg["alias"],
        "thresholds": {k: cfg[k] for k in ("min_gain", "max_forgetting", "champion_min_gain",
                                           "champion_max_forgetting", "min_documents")},
        "checks": checks,
        "per_source": by_source,
        "per_lang": by_lang,
        "vs_base": {**pooled, "note": "pooled over sources, byte-weighted: information only (the per-source and "
                                      "per-language verdicts decide)"},
        "vs_champion": {k: v for k, v in champ.items() if k != "notes"},
        "sources": {n: {"domain": cpt[n]["domain"], "bytes": cpt[n]["bytes"], "base_bpb": base[n]["bpb"],
                        "cpt_bpb": cpt[n]["bpb"]} for n in sorted(common)},
        "notes": notes,
    }
    for key in ("gain", "forgetting"):  # the eval stage's own per-language view, kept for the reader
        if isinstance(eval_metrics.get(key), dict):
            result[f"eval_{key}"] = eval_metrics[key]
    return result


def candidate_sources(decision: dict[str, Any]) -> dict[str, dict]:
    """Per-source bpb only (no units, no hash): what is registered when the caller has no record of the candidate;
    a later gate cannot pair with it and re-scores."""
    return {n: {"domain": s["domain"], "bytes": s["bytes"], "bpb": s["cpt_bpb"]} for n, s in decision["sources"].items()}


def summary_metrics(decision: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for the tracker (``gate/...``)."""
    out = {"gate/passed": float(decision["passed"]), "gate/promoted": float(decision["promoted"]),
           "gate/undecided": float(decision.get("decision") == "undecided")}
    for side in ("vs_base", "vs_champion"):
        for key in ("gain", "forgetting"):
            value = decision.get(side, {}).get(key)
            if isinstance(value, (int, float)):
                out[f"gate/{side}/{key}"] = float(value)
    return out


def sources_path(layout: Any) -> Path:
    """data/eval/sources.json: the candidate's record (``cpt.evaluation.record``), as the registry keeps it."""
    return record.path(layout)


def promote(params: dict[str, Any], eval_metrics: dict[str, Any], tracker: Any, model_dir: Any,
            model_name: str | None = None, rescore: Any = None, sources_file: Path | None = None,
            candidate: dict[str, dict] | None = None) -> dict[str, Any]:
    """Champion lookup (+ re-score) -> decision -> register ``model_dir`` as a new version of ``model_name``
    (default: the tracker's ``tracking.model_name``) -> alias. Tracking problems are recorded in the decision, never
    raised. The eval hook below uses it for the CPT model; the sft stage for its own model under its own name.

    ``candidate``: the candidate's record (per-unit NLL, documents, content hashes; ``cpt.evaluation.record``).
    ``rescore(model_dir) -> record`` scores a model folder on the candidate's units (eval: ``cpt.stages.eval.rescore``;
    sft: ``cpt.sft.rescore``); used when the champion's stored record does not match, on a downloaded copy that is
    deleted afterwards. ``sources_file``: where the candidate's record is kept (eval: data/eval/sources.json, a DVC
    output); it is registered with the version as the artifact ``gate/sources.json``, which a later gate pairs with."""
    cfg = gate_params(params)
    champion, note, lookup_failed, rescored = None, None, False, None
    candidate = candidate if record.is_record(candidate) else None
    if not getattr(tracker, "active", False):
        model_name = None
        note = "tracking off: champion comparison skipped, nothing registered"
    else:
        model_name = model_name or tracker.model_name
        try:
            champion = tracker.get_alias(model_name, cfg["alias"])
            note = None if champion else f"no '{cfg['alias']}' for registered model '{model_name}' yet"
        except Exception as exc:  # noqa: BLE001 - a down server must not fail eval
            note = f"champion lookup failed ({type(exc).__name__}: {exc}); comparison skipped"
            lookup_failed = True
    if champion is not None:
        same, why = record.matches(candidate or {}, champion.get("sources"))
        if not same and candidate:
            log.info("gate: champion v%s's stored scores do not pair (%s): re-scoring it", champion.get("version"), why)
            rescored, note = champ_mod.rescore(champion, tracker, rescore)
        elif not same:
            note = "the candidate's per-unit scores are missing, so nothing can be paired"
    decision = decide(eval_metrics, params, champion, note, rescored, candidate)
    decision["registered_model"] = model_name
    decision["version"] = None
    # The numbers a later gate pairs with: an artifact of the registered version (a JSON tag would be unreadable in
    # the registry UI). A caller without a file of its own gets a temporary one.
    with contextlib.ExitStack() as stack:
        if sources_file is None:
            sources_file = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "sources.json"
        write_json(sources_file, candidate or candidate_sources(decision), sort_keys=True)
        _register_and_alias(decision, cfg, tracker, model_dir, model_name, sources_file, lookup_failed)
    registry_view.describe(tracker, decision)  # the version's description (decision first) and budget tags
    if getattr(tracker, "active", False):
        tracker.log_metrics(summary_metrics(decision))
        tracker.set_tags({"cpt.gate.promoted": decision["promoted"], "cpt.gate.reason": decision["reason"][:5000]})
    level = logging.INFO if decision["passed"] else logging.WARNING
    shown = "PROMOTED" if decision["promoted"] else decision["decision"]
    log.log(level, "gate (%s): %s (%s)", model_name or "untracked", shown, decision["reason"])
    return decision


def _register_and_alias(decision: dict[str, Any], cfg: dict[str, Any], tracker: Any, model_dir: Any,
                        model_name: str | None, sources_file: Path, lookup_failed: bool) -> None:
    if getattr(tracker, "active", False):
        other_name = {} if model_name == tracker.model_name else {"name": model_name}
        try:
            decision["version"] = tracker.register_model(
                model_dir, tags={**registry_view.tags(decision), "cpt.gate.reason": decision["reason"][:5000],
                                 "cpt.gate.passed": decision["passed"]},
                artifacts={"gate": sources_file}, **other_name)
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


def run(params: dict[str, Any], layout: Any, eval_metrics: dict[str, Any], tracker: Any,
        rescore: Any = None) -> dict[str, Any]:
    """Post-eval hook: ``promote`` the CPT model (data/models/cpt), then write ``metrics/gate.json`` and the
    decision into the eval report. The eval results are already safe on disk."""
    # data/eval/sources.json (the candidate's record, written by eval) is a DVC output of eval that is NOT in git: a
    # fresh clone has no copy, so `dvc repro` runs eval (and this gate) for the model it just trained.
    path = sources_path(layout)
    candidate = read_json(path) if path.exists() else None
    candidate = candidate if record.is_record(candidate) else None  # an older file: per-source bpb only
    decision = promote(params, eval_metrics, tracker, layout.model, rescore=rescore, sources_file=path,
                       candidate=candidate)
    write_json(layout.metrics_file("gate"), decision, sort_keys=True)
    tracker.log_artifact(layout.metrics_file("gate"))
    report = layout.reports / "eval" / "report.md"
    if verdict.write_into(report, decision):  # the eval report shows the final decision, per source and language
        tracker.log_artifact(report, "eval")
    return decision
