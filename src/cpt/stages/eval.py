"""Stage ``eval``: did the model gain the new language, and what did it forget? Base vs cpt, side by side.

Both models score the same documents with their own tokenizers; bits per UTF-8 byte makes the numbers comparable
across the vocabulary extension (``cpt.evaluation.bpb``). Per language:

    forgetting = bpb(cpt) - bpb(base)   pooled over the old-domain sources of that language (> 0: forgot)
    gain       = bpb(base) - bpb(cpt)   pooled over the new-domain sources of that language (> 0: learned)

Sources: every ``role: eval`` source in data/clean (WikiText-2 test, NTREX-128 ...), plus the held-out training-
distribution documents the shards stage split off (data/shards/heldout.jsonl), scored per language as
``heldout_<lang>``. Greedy/sampled generations and a one-page report with the training curves go to reports/eval/;
downstream tasks (XCOPA among them) are the next stage's, ``downstream`` (lm-evaluation-harness). Before scoring, the training shards are decoded and checked for
evaluation documents (``cpt.evaluation.overlap``): a leak stops the stage.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from cpt.errors import ConfigError
from cpt.evaluation import record, report, scoring
from cpt.evaluation.scoring import score_models
from cpt.evaluation.overlap import check_overlap
from cpt.evaluation.sources import collect_sources
from cpt.evaluation.summary import assemble
from cpt.io import write_json
from cpt.layout import Layout
from cpt.ops import tracking
from cpt.params import section, unknown_keys_message

log = logging.getLogger("cpt.stages.eval")

DEFAULTS: dict[str, Any] = {
    "base": "data/base",
    "model": "data/models/cpt",
    "heldout": "data/shards/heldout.jsonl",
    "train_curve": "metrics/train_curve.csv",
    "sources": None,
    "max_docs": None,
    "max_bytes": 20_000,
    "max_bytes_old": 200_000,
    "unit_bytes": 4096,
    "bootstrap_resamples": 1000,
    "max_length": 1024,
    "stride": 768,
    "batch_size": 8,
    "device": "auto",
    "dtype": "auto",
    "threads": None,
    "overlap": {"enabled": True, "shards": "data/shards", "max_tokens": 50_000_000, "fail": True},
    "samples": {
        "enabled": True,
        "max_new_tokens": 40,
        "temperature": 0.8,
        "top_p": 0.95,
        "prompts": {
            "en": ["The history of the city begins"],
            "vi": ["Hà Nội là thủ đô của", "Sông Mê Kông chảy qua"],
            "zh": ["北京是中国的"],
        },
    },
}


def config(params: dict) -> dict[str, Any]:
    """The eval section merged over DEFAULTS (nested sections merged key by key), with ranges checked."""
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in section(params, "eval").items():
        if key not in cfg:
            raise ConfigError(unknown_keys_message("eval", [key], sorted(cfg)))
        if isinstance(cfg[key], dict) and key != "samples":
            if not isinstance(value, dict):
                raise ConfigError(f"eval.{key}: expected a mapping")
            unknown = set(value) - set(cfg[key])
            if unknown:
                raise ConfigError(unknown_keys_message(f"eval.{key}", sorted(unknown), sorted(cfg[key])))
            cfg[key].update(value)
        elif key == "samples":
            cfg[key].update(value or {})
        else:
            cfg[key] = value
    for key in ("max_length", "stride", "batch_size", "bootstrap_resamples"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"eval.{key}: must be a positive integer, got {cfg[key]!r}")
    if cfg["max_length"] < 2 or cfg["stride"] >= cfg["max_length"]:
        raise ConfigError(f"eval.stride ({cfg['stride']}) must be < eval.max_length ({cfg['max_length']})")
    for key in ("max_docs", "max_bytes", "max_bytes_old", "threads", "unit_bytes"):
        if cfg[key] is not None and (not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ConfigError(f"eval.{key}: must be a positive integer or null, got {cfg[key]!r}")
    return cfg


def run(params: dict, layout: Layout) -> dict:
    cfg = config(params)
    threads = torch.get_num_threads()
    if cfg["threads"]:
        # Tiny models on a shared CPU: intra-op threads that wait on each other cost more than they give.
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _run(params, layout, cfg)
    finally:
        torch.set_num_threads(threads)


def _run(params: dict, layout: Layout, cfg: dict) -> dict:
    seed = int(params.get("seed", 0))
    torch.manual_seed(seed)
    sources = collect_sources(layout, cfg, seed)
    for s in sources:
        log.info("source %-16s %s/%-3s %4d of %4d units, %d bytes", s.name, s.domain, s.lang, len(s.texts),
                 s.available, sum(len(t.encode()) for t in s.texts))
    overlap_result = check_overlap(layout, cfg)

    paths = {"base": layout.resolve(cfg["base"]), "cpt": layout.resolve(cfg["model"])}
    scores, gens, info = score_models(paths, sources, cfg, seed, layout)
    metrics = assemble(scores, sources, overlap_result, resamples=int(cfg["bootstrap_resamples"]), seed=seed)
    # the candidate's per-unit scores: the gate pairs them with the champion's, and registers them with the version
    write_json(record.path(layout), record.of_scores(sources, scores["cpt"], scoring.scoring_config(cfg)),
               sort_keys=True)
    # the base's, on the same units: `cpt merge` pairs its points with it instead of re-scoring the base
    write_json(record.base_path(layout), record.of_scores(sources, scores["base"], scoring.scoring_config(cfg)),
               sort_keys=True)
    out_dir = layout.reports / "eval"
    report.write_all(
        out_dir, metrics=metrics, sources=sources, scores=scores, samples=gens,
        models=info, curve=layout.resolve(cfg["train_curve"]), cfg=cfg,
    )
    tracker = tracking.current()
    for path in sorted(out_dir.glob("*")):
        tracker.log_artifact(path, "eval")
    return metrics


def rescore(params: dict, layout: Layout, model_dir: Path) -> dict[str, dict[str, Any]]:
    """Another model folder (the registered champion) scored on exactly this eval's units, under the same scoring
    configuration: its record (``cpt.evaluation.scoring.rescore``), which pairs with the candidate's unit by unit."""
    return scoring.rescore(config(params), layout, int(params.get("seed", 0)), model_dir)
