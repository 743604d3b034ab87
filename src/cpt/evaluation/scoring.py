"""Scoring the models eval compares, one in memory at a time: bits per byte on every source, samples."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from cpt.device import autocast_dtype, pick_device
from cpt.evaluation import record, samples
from cpt.evaluation.bpb import BpbScorer, Score
from cpt.evaluation.models import load_model
from cpt.evaluation.sources import collect_sources
from cpt.layout import Layout

log = logging.getLogger("cpt.stages.eval")


def score_models(paths: dict[str, Path], sources: list, cfg: dict, seed: int,
                 layout) -> tuple[dict, dict, dict]:
    """Each model in turn (one in memory at a time): bits per byte on every source, samples.
    Returns (scores, generations, model info), each keyed by model name. (Downstream tasks, XCOPA included, are the
    ``downstream`` stage's: lm-evaluation-harness.)"""
    scores: dict[str, dict[str, Score]] = {}
    gens: dict[str, list[dict[str, str]]] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, path in paths.items():
        lm = load_model(name, path, device=cfg["device"], dtype=cfg["dtype"])
        scorer = BpbScorer(lm, cfg["max_length"], cfg["stride"], cfg["batch_size"])
        info[name] = {"path": shown(path, layout), "params": lm.parameters, "vocab": len(lm.tokenizer),
                      "max_length": scorer.max_length, "stride": scorer.stride}
        scores[name] = {s.name: scorer.score(s.texts, desc=s.name) for s in sources}
        for s in sources:
            log.info("%s %-16s bpb %.4f (loss %.4f over %d tokens)", name, s.name, scores[name][s.name].bpb,
                     scores[name][s.name].loss, scores[name][s.name].tokens)
        scfg = cfg["samples"]
        if scfg.get("enabled", True) and scfg.get("prompts"):
            gens[name] = samples.generate(
                lm, scfg["prompts"], max_new_tokens=int(scfg["max_new_tokens"]),
                temperature=float(scfg["temperature"]), top_p=float(scfg["top_p"]), seed=seed,
            )
        del lm, scorer
        gc.collect()

    return scores, gens, info


def shown(path: Path, layout: Layout) -> str:
    """A path as the report shows it: relative to the project root when inside it (stable across machines)."""
    try:
        return str(Path(path).relative_to(layout.root))
    except ValueError:
        return str(path)


def scoring_config(cfg: dict) -> dict[str, Any]:
    """``record.scoring_config`` with the device and autocast dtype resolved as ``load_model`` resolves them."""
    dev = pick_device(cfg["device"])
    amp = autocast_dtype(dev, cfg["dtype"])
    return record.scoring_config(cfg, dev.type, None if amp is None else str(amp).removeprefix("torch."))


def rescore(cfg: dict, layout: Layout, seed: int, model_dir: Path) -> dict[str, dict[str, Any]]:
    """Score another model folder (the registered champion) on exactly eval's units: the same sources, units and
    budget as the eval stage (seeded), under the same scoring configuration, so it pairs with the candidate unit by
    unit. Returns its record (``cpt.evaluation.record``: per-unit NLL, documents, content hash per source)."""
    sources = collect_sources(layout, cfg, seed)
    lm = load_model("champion", Path(model_dir), device=cfg["device"], dtype=cfg["dtype"])
    scorer = BpbScorer(lm, cfg["max_length"], cfg["stride"], cfg["batch_size"])
    scores = {s.name: scorer.score(s.texts, desc=s.name) for s in sources}
    return record.of_scores(sources, scores, scoring_config(cfg))
