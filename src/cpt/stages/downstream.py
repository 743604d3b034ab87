"""Stage ``downstream``: lm-evaluation-harness tasks on base and cpt, paired, with 95% intervals (after ``eval``).

English tasks (ARC-Easy, PIQA, COPA, WinoGrande, LAMBADA, Belebele) say what the model can still do; new-language
tasks (Belebele vi/zh, ARC-Easy vi, XCOPA vi/zh) what it learned. The work is in ``cpt.evaluation.downstream``
(lm-eval, local task YAMLs, cpt's BOS convention) and ``cpt.evaluation.downstream_stats`` (paired bootstrap over
items); the gate rule ``gate.max_downstream_drop`` in ``cpt.ops.downstream_gate``. Outputs: metrics/downstream.json,
reports/downstream.md, the ``downstream`` block of metrics/summary.json. docs/downstream.md.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from cpt.errors import ConfigError
from cpt.io import read_json
from cpt.layout import Layout
from cpt.ops import tracking
from cpt.params import section, unknown_keys_message

log = logging.getLogger("cpt.stages.downstream")

DEFAULTS: dict[str, Any] = {
    "base": "data/base",
    "model": "data/models/cpt",
    "tasks": ["arc_easy_en", "piqa_en", "copa_en", "winogrande_en", "lambada_openai_en", "belebele_en",
              "belebele_vi", "belebele_zh", "arc_easy_vi", "xcopa_vi", "xcopa_zh"],
    "max_items": 40,
    "num_fewshot": 0,
    "batch_size": 8,
    "device": "auto",
    "threads": None,
    "bootstrap_resamples": 1000,
}


def config(params: dict) -> dict[str, Any]:
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in section(params, "downstream").items():
        if key not in cfg:
            raise ConfigError(unknown_keys_message("downstream", [key], sorted(cfg)))
        cfg[key] = value
    from cpt.evaluation.downstream import specs

    if not isinstance(cfg["tasks"], list) or not cfg["tasks"]:
        raise ConfigError(f"downstream.tasks: expected a non-empty list, got {cfg['tasks']!r}")
    specs(cfg["tasks"])
    for key in ("max_items", "threads"):
        if cfg[key] is not None and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ConfigError(f"downstream.{key}: must be a positive integer or null, got {cfg[key]!r}")
    for key, low in (("batch_size", 1), ("bootstrap_resamples", 1), ("num_fewshot", 0)):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < low:
            raise ConfigError(f"downstream.{key}: must be an integer >= {low}, got {cfg[key]!r}")
    from cpt.ops.gate import gate_params

    gate_params(params)  # gate.max_downstream_drop is checked before any model loads
    return cfg


def old_langs(params: dict) -> set[str]:
    """Languages of the old domain (ingest.sources with domain: old), English when none is declared."""
    langs = {str(s["lang"]) for s in section(params, "ingest").get("sources") or []
             if isinstance(s, dict) and s.get("domain") == "old" and s.get("lang")}
    return langs or {"en"}


def run(params: dict, layout: Layout) -> dict:
    import torch

    from cpt.device import pick_device
    from cpt.evaluation import downstream, downstream_stats as stats
    from cpt.ops import downstream_gate, summary

    cfg = config(params)
    seed = int(params.get("seed", 0))
    threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    try:
        corpora = layout.resolve(section(params, "ingest").get("corpus_dir", "../shared/corpora"))
        paths = {"base": layout.resolve(cfg["base"]), "cpt": layout.resolve(cfg["model"])}
        results = downstream.run_models(paths, cfg["tasks"], corpora, limit=cfg["max_items"],
                                        num_fewshot=cfg["num_fewshot"], batch_size=cfg["batch_size"],
                                        device=str(pick_device(cfg["device"])), seed=seed)
    finally:
        torch.set_num_threads(threads)
    tasks = downstream.specs(cfg["tasks"])
    rs = int(cfg["bootstrap_resamples"])
    rows = stats.table(results, tasks, resamples=rs, seed=seed)
    old = old_langs(params)
    aggregates = {
        "forgetting_en": stats.aggregate(results, [t for t in tasks if t.lang in old], sign=-1, resamples=rs, seed=seed),
        "gain_new": stats.aggregate(results, [t for t in tasks if t.lang not in old], sign=+1, resamples=rs, seed=seed),
    }
    gate_file = layout.metrics_file("gate")
    tracker = tracking.current()
    gate = downstream_gate.rejudge(params, read_json(gate_file) if gate_file.exists() else {}, rows, old, tracker)
    import lm_eval

    info = {"lm_eval": getattr(lm_eval, "__version__", "?"), "num_fewshot": cfg["num_fewshot"],
            "max_items": cfg["max_items"], "resamples": rs, "seed": seed, "add_bos_token": False,
            "prefix": "the model's own prefix token (cpt.tok.codec), as cpt's bits per byte"}
    out: dict[str, Any] = {"downstream": rows, **{k: v for k, v in aggregates.items() if v}, "gate": gate,
                           "settings": info,
                           "timings": {m: {k: r["seconds"] for k, r in res.items()}
                                                for m, res in results.items()}}
    report = layout.reports / "downstream.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(stats.markdown(rows, aggregates, gate, info), encoding="utf-8")
    tracker.log_artifact(report, "downstream")
    headline = summary.write(layout, downstream=out)
    if getattr(tracker, "active", False):  # the headline, now with the downstream line, where eval put it
        metrics = summary.mlflow_metrics(headline)
        tracker.log_metrics(metrics)
        tracker.log_parent_metrics({k: v for k, v in metrics.items() if k.startswith("summary/downstream")})
        eval_gate = read_json(gate_file) if gate_file.exists() else {}
        from cpt.ops.headline import chart_markdown, last_train_trained

        text = summary.markdown(headline, eval_gate, trained=last_train_trained(layout), chart=chart_markdown(tracker))
        tracker.set_parent_tags({"mlflow.note.content": text, "cpt.gate.decision": headline["decision"]})
    return out
