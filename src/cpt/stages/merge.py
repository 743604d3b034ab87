"""Stage ``merge``: the gain-forgetting frontier between the base and the cpt model, and the best model the gate's
budget allows.

    theta(a) = (1 - a) theta_base + a theta_cpt     (shared weights; new token rows keep the cpt's values)

For every a of ``merge.grid`` the merged model is scored by eval's scorer on eval's units and compared with the
base's scores eval recorded (paired, the same document bootstrap); a = 0 and a = 1 are eval's own records, never
re-scored. metrics/merge.json: ``points`` (per a: gain / forgetting per language and per source with 95% intervals,
the gate's decision vs the base), ``chosen`` (the largest a the gate promotes, or null), ``reason``,
``max_forgetting``; reports/merge/frontier.png. The chosen model is written to data/models/merged and goes through
the gate (vs the base and the current champion) as a registered, described version (``cpt.merge``, docs/merge.md).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cpt.errors import ConfigError
from cpt.evaluation import scoring
from cpt.layout import Layout
from cpt.merge import run as merge_run
from cpt.ops import tracking
from cpt.params import stage_config
from cpt.stages import eval as eval_stage

log = logging.getLogger("cpt.stages.merge")

DEFAULTS: dict[str, Any] = {
    "grid": [0.25, 0.5, 0.75],  # interior a values scored here; 0 and 1 are eval's records
    "out": "data/models/merged",  # the chosen merged model (HF folder); only merge.json when none is chosen
    "records": "data/merge",  # per-point per-unit records (a0.5000.json ...), the registered version's scores
    "register": True,  # put the chosen model through the gate into the registry (tracking on)
    "model_name": None,  # registered model name; null = tracking.model_name (competes for the same champion)
}


def config(params: dict) -> dict[str, Any]:
    cfg = stage_config(params, "merge", DEFAULTS)
    grid = cfg["grid"]
    if not isinstance(grid, list) or any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in grid):
        raise ConfigError(f"merge.grid: expected a list of numbers, got {grid!r}")
    bad = [a for a in grid if not 0.0 < float(a) < 1.0]
    if bad:
        raise ConfigError(f"merge.grid: {bad} not strictly between 0 and 1 (a = 0 is the base and a = 1 the cpt "
                          "model: eval's own records, reused, never re-scored)")
    cfg["grid"] = sorted({float(a) for a in grid})
    eval_stage.config(params)  # eval's section decides the units and the scorer: checked before any work
    return cfg


def run(params: dict, layout: Layout) -> dict:
    cfg = config(params)
    eval_cfg = eval_stage.config(params)
    seed = int(params.get("seed", 0))
    threads = torch.get_num_threads()
    if eval_cfg["threads"]:
        torch.set_num_threads(int(eval_cfg["threads"]))
    try:
        metrics = merge_run.run(
            params, layout, cfg, eval_cfg, tracker=tracking.current(),
            # the current champion, when its stored scores do not pair, is re-scored on eval's units
            rescore=lambda folder: scoring.rescore(eval_cfg, layout, seed, folder))
    finally:
        torch.set_num_threads(threads)
    shown = "none" if metrics["chosen"] is None else f"a={metrics['chosen']:g}"
    log.info("chosen: %s (%s)", shown, metrics["reason"])
    return metrics
