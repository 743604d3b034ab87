"""The merge stage's work: score the grid, choose, draw, write and register.

Cost: every interior point is one scoring pass of the cpt-sized model over eval's bits-per-byte units (no XCOPA, no
samples); a = 0 and a = 1 are eval's records. The base's and cpt's tensors are loaded once and each point is written
into one model in place. The time per point is logged and kept in metrics/timings/merge.json.
"""

from __future__ import annotations

import gc
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cpt.evaluation import record
from cpt.evaluation.models import load_model
from cpt.io import read_json, write_json
from cpt.merge import frontier, interpolate, points, register
from cpt.ops import gate

log = logging.getLogger("cpt.stages.merge")


def _public(p: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in p.items() if not k.startswith("_")}


def run(params: dict, layout: Any, cfg: dict, eval_cfg: dict, *, tracker: Any, rescore: Any = None) -> dict:
    seed = int(params.get("seed", 0))
    resamples = int(eval_cfg["bootstrap_resamples"])
    th = gate.gate_params(params)
    sources, base_rec, cpt_rec, config = points.eval_records(layout, eval_cfg, seed)
    base = points.scores_of(base_rec, sources)
    kw = {"resamples": resamples, "seed": seed}
    pts = [points.point(0.0, base, base, sources, params, scored="eval record (the base)", **kw),
           points.point(1.0, base, points.scores_of(cpt_rec, sources), sources, params,
                        scored="eval record (the cpt model)", **kw)]
    base_dir, cpt_dir = layout.resolve(eval_cfg["base"]), layout.resolve(eval_cfg["model"])
    out, records_dir = layout.resolve(cfg["out"]), layout.resolve(cfg["records"])
    timings: dict[str, float] = {}
    lm = pair = None
    if cfg["grid"]:
        t0 = time.perf_counter()
        lm, pair = _load(base_dir, cpt_dir, eval_cfg)
        timings["load"] = round(time.perf_counter() - t0, 3)
        log.info("loaded base + cpt (%d shared vocabulary rows of %d) in %.1fs", pair.shared,
                 lm.model.get_input_embeddings().weight.shape[0], timings["load"])
    shutil.rmtree(records_dir, ignore_errors=True)  # an earlier grid's records must not pass for this one's
    records_dir.mkdir(parents=True)
    for alpha in cfg["grid"]:
        t0 = time.perf_counter()
        interpolate.apply(lm.model, pair, alpha)
        scores = points.score(lm, sources, eval_cfg)
        write_json(records_dir / f"a{alpha:.4f}.json", record.of_scores(sources, scores, config), sort_keys=True)
        p = points.point(alpha, base, scores, sources, params, scored="merged, scored here", **kw)
        pts.append(p)
        timings[f"a={alpha:g}"] = round(time.perf_counter() - t0, 3)
        log.info("a=%.3g: scored in %.1fs: %s", alpha, timings[f"a={alpha:g}"], p["reason"])
    pts.sort(key=lambda p: p["alpha"])
    for p in pts:
        p["binding"] = frontier.binding(p)
    full = next(p for p in pts if p["alpha"] == 1.0)
    for p in pts:
        p["gain_kept"] = frontier.gain_kept(p, full)
    for p in pts:  # MLflow: each curve against a (step = 1000 a), so the run's charts draw the frontier per language
        f_hi = ((p["binding"]["forgetting"] or {}).get("ci95") or [None, None])[1]
        tracker.log_metrics({**{f"merge/gain/{k}": v for k, v in p["gain"].items()},
                             **{f"merge/forgetting/{k}": v for k, v in p["forgetting"].items()},
                             **({"merge/binding_forgetting_upper": f_hi} if f_hi is not None else {}),
                             "merge/passed": float(p["decision"] == "promote")}, step=int(round(1000 * p["alpha"])))
    chosen, reason = frontier.choose(pts)
    png = frontier.plot(layout.reports / "merge" / "frontier.png", pts, max_forgetting=th["max_forgetting"],
                        min_gain=th["min_gain"], chosen=chosen)
    tracker.log_artifact(png, "merge")
    info = {"alpha": chosen, "base": str(eval_cfg["base"]), "cpt": str(eval_cfg["model"]), "rule": interpolate.RULE,
            "reason": reason}
    decision = None
    if chosen is None or chosen in (0.0, 1.0):
        if chosen is not None:  # an endpoint: its scores are eval's records of that very model
            what = ("the cpt model itself (data/models/cpt, registered by eval's gate)" if chosen == 1.0
                    else "the base itself")
            reason += f"; that is {what}: nothing merged"
        interpolate.placeholder(out, {**info, "reason": reason, "model": None})
    else:
        interpolate.apply(lm.model, pair, chosen)
        interpolate.save(lm.model, cpt_dir, out, info)
        if cfg["register"]:
            rec_file = records_dir / f"a{chosen:.4f}.json"
            point = next(p for p in pts if p["alpha"] == chosen)
            decision = register.register(params, point["_eval_like"], tracker, out, rec_file, read_json(rec_file),
                                         chosen, model_name=cfg["model_name"], rescore=rescore)
        log.info("merged model a=%g written to %s%s", chosen, out,
                 f"; gate: {decision['decision']} ({decision['reason']})" if decision else "")
    del lm, pair
    gc.collect()
    chosen_point = next((p for p in pts if p["alpha"] == chosen), None)
    return {
        "points": [_public(p) for p in pts], "chosen": chosen, "reason": reason,
        "max_forgetting": th["max_forgetting"], "min_gain": th["min_gain"], "min_documents": th["min_documents"],
        "grid": list(cfg["grid"]), "rule": interpolate.RULE,
        "chosen_gain_kept": chosen_point["gain_kept"] if chosen_point else None,
        "chosen_forgetting_upper": ((chosen_point["binding"]["forgetting"] or {}).get("ci95") or [None, None])[1]
        if chosen_point else None,
        "gate": register.summary(decision) if decision else None,
        "timings": timings,
    }


def _load(base_dir: Path, cpt_dir: Path, eval_cfg: dict) -> tuple[Any, interpolate.Pair]:
    """The cpt model as eval loads it (its tokenizer, device, autocast) and the two endpoints' tensors."""
    from transformers import AutoModelForCausalLM

    lm = load_model("merged", cpt_dir, device=eval_cfg["device"], dtype=eval_cfg["dtype"])
    shared = interpolate.shared_rows(base_dir, cpt_dir)
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pair = interpolate.pair(base_model, lm.model, shared)
    del base_model
    gc.collect()
    return lm, pair
