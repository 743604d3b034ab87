"""The chosen merged model into the registry, through the gate (the ops edge; mlflow stays inside the tracker).

``cpt.ops.gate.promote`` does for the merged model what it does for the cpt model after eval: looks up the current
champion (re-scoring it on eval's units when its stored record does not pair), decides vs the base AND vs the
champion, registers the folder as a new version of ``merge.model_name`` (default: ``tracking.model_name``, the cpt
model's name, so the merged model competes for the same ``champion`` alias) with its per-unit record as the
artifact ``gate/sources.json``, and sets the alias when every check passes. The version's description is the
gate's (decision first) plus what the version is: "merge a=0.5 of base and cpt".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from cpt.ops import gate, registry_view

log = logging.getLogger("cpt.stages.merge")


def register(params: dict[str, Any], eval_like: dict[str, Any], tracker: Any, model_dir: Path,
             record_file: Path, candidate: dict[str, dict], alpha: float, *, model_name: str | None = None,
             rescore: Callable[[Path], dict] | None = None) -> dict[str, Any]:
    """Gate + register + describe the merged model; returns the gate's decision (as metrics/gate.json holds it)."""
    decision = gate.promote(params, eval_like, tracker, model_dir, model_name=model_name, rescore=rescore,
                            sources_file=record_file, candidate=candidate)
    version, name = decision.get("version"), decision.get("registered_model")
    if version and getattr(tracker, "active", False):
        text = (f"{registry_view.description(decision)} | merge a={alpha:g}: (1 - a) base + a cpt, new token rows "
                "from cpt")
        try:
            tracker.describe_version(str(version), text, name=name, tags={"cpt.merge.alpha": f"{alpha:g}"})
        except Exception as exc:  # noqa: BLE001 - a description never fails the stage
            log.warning("could not describe %s version %s: %s", name, version, exc)
    return decision


def summary(decision: dict[str, Any]) -> dict[str, Any]:
    """What metrics/merge.json keeps of the decision (the whole one is in the MLflow run)."""
    champ = decision.get("vs_champion") or {}
    return {k: decision.get(k) for k in ("decision", "passed", "promoted", "reason", "registered_model", "version")} \
        | {"vs_champion": {"checked": bool(champ.get("checked")), "version": champ.get("version"),
                           "decision": champ.get("decision"), "reasons": champ.get("reasons")}}
