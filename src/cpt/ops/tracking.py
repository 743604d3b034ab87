"""Experiment tracking at the edge of the library.

Stages talk to ``cpt.ops.tracking.current()`` only: ``log_metrics``, ``log_params``, ``log_artifact``, ``set_tags``.
Without mlflow installed, or with ``tracking.enabled: false`` (or ``CPT_TRACKING=0``), that is the null tracker and
costs nothing; the training path therefore runs with only torch + transformers installed.

The MLflow tracker (chosen by ``for_stage``) never lets a down or slow tracking server kill a stage:

* every call only appends an operation to an in-memory queue; a daemon thread sends the queue in batches every
  ``flush_interval`` seconds (``log_batch``), so a training step never waits on the network;
* HTTP calls use short timeouts and no retries (``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``_MAX_RETRIES`` from params
  unless already set); a failure keeps the queue and retries later, in order, so nothing is lost or reordered;
* ``close`` retries for ``close_timeout`` seconds; what still could not be sent is written to a JSONL spool file
  (``tracking.spool_dir``, with copies of the artifacts), and the next ``cpt`` stage (or
  ``python -m cpt.ops.tracking replay``) replays it into the same run and tags the run with what arrived late.

Run layout, one MLflow run per pipeline execution with one nested run per stage:

* a Prefect flow opens the parent run and hands its id to the stage processes in ``CPT_MLFLOW_RUN_ID``;
* under ``dvc exp run`` (``DVC_EXP_NAME`` set by DVC) the stages share a parent named after the experiment;
* under a plain ``dvc repro`` the stages share a parent keyed by the execution: each ``dvc`` invocation is one
  (``cpt.ops.execution``), so a rerun never piles onto an earlier parent (outside DVC: by git commit, params hash
  and process);
* the parent is named for what changed (``cpt.ops.run_names``), with `` #2``, `` #3`` when an earlier execution has
  that name, and ends FINISHED or FAILED with every stage (the next stage of the same pipeline sets it RUNNING
  again).

A stage's final metrics go to its own run; the parent gets the per-step curves (``loss/new``, ``loss/old`` ...) and,
after eval, the headline (``summary/...``, the description, the gate's verdict: ``cpt.ops.headline``), so the
compare view shows a few comparable numbers instead of every stage's hundreds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from cpt.ops.execution import execution_id
from cpt.ops.mlflow_tracker import MlflowTracker, replay
from cpt.ops.run_meta import (
    DEFAULTS,
    ENV_PARENT,
    ENV_SWITCH,
    STAGE_ARTIFACTS,
    configure_mlflow_env,
    flatten_metrics,
    params_hash,
    run_tags,
    settings,
)
from cpt.ops.run_names import pipeline_label
from cpt.ops.tracker import Tracker, TrackingUnavailable, activate, current

__all__ = ["DEFAULTS", "ENV_PARENT", "ENV_SWITCH", "STAGE_ARTIFACTS", "MlflowTracker", "Tracker",
           "TrackingUnavailable", "activate", "current", "flatten_metrics", "for_stage", "open_pipeline_run",
           "params_hash", "replay", "run_tags", "settings"]

log = logging.getLogger("cpt.ops.tracking")


def _mlflow_importable() -> bool:
    """Without importing it (that costs seconds; the tracker's thread does it)."""
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


def for_stage(stage: str, params: dict[str, Any], layout: Any) -> Tracker:
    """The tracker for one stage run: MLflow when configured and importable, else the null tracker."""
    cfg = settings(params, layout)
    if not cfg["enabled"]:
        return Tracker()
    if not _mlflow_importable():
        log.warning("tracking: mlflow is not installed; stage %s runs untracked", stage)
        return Tracker()
    configure_mlflow_env(cfg)
    from cpt.params import flatten

    tags = {**run_tags(params, layout), "cpt.stage": stage, "mlflow.source.name": f"cpt {stage}"}
    flat = flatten(params)
    parent_run_id = os.environ.get(ENV_PARENT) or None
    parent = None
    if parent_run_id is None:
        # one parent per execution (the dvc process running the stages: cpt.ops.execution), not per (commit,
        # params): a rerun gets a parent of its own, named "<label> #2" by the sink when the label is taken, and a
        # commit made while a long `dvc repro` runs does not split it
        run = execution_id()
        if os.environ.get("DVC_EXP_NAME"):
            key = f"exp:{os.environ['DVC_EXP_NAME']}:{os.environ.get('DVC_EXP_BASELINE_REV', '')[:12]}:{run}"
        elif cfg["group_stages"] and run.startswith("dvc:"):
            key = f"repro:{run}"
        elif cfg["group_stages"]:  # not under DVC: one process may run several pipelines (a notebook, tests)
            key = f"repro:{(tags.get('mlflow.source.git.commit') or 'nogit')[:12]}:{tags['cpt.params_hash']}:{run}"
        else:
            key = None
        if key:
            name, name_tags = pipeline_label(params, str(layout.root), tags.get("mlflow.source.git.commit"))
            ptags = {k: v for k, v in tags.items() if k not in ("cpt.stage", "mlflow.source.name")}
            parent = {"key": key, "name": name, "tags": {**ptags, **name_tags, "mlflow.source.name": "dvc",
                                                         "cpt.pipeline_label": name, "cpt.execution": run},
                      "params": flat}
    return MlflowTracker(cfg, run_name=stage, tags=tags, params=flat, stage=stage, parent_run_id=parent_run_id,
                         parent=parent, replay_first=Path(cfg["spool_dir"]).is_dir())


def open_pipeline_run(params: dict[str, Any], layout: Any, name: str, tags: dict[str, Any] | None = None) -> Tracker:
    """The parent run of one pipeline execution (opened by the Prefect flow ``name``, tag ``cpt.flow``; the run is
    named for what changed, as under DVC: ``cpt.ops.run_names``). Its ``run_id`` (None if the store is
    down at that moment) goes to the stage processes in ``CPT_MLFLOW_RUN_ID``; ``close(status)`` ends it."""
    cfg = settings(params, layout)
    if not cfg["enabled"] or not _mlflow_importable():
        return Tracker()
    configure_mlflow_env(cfg)
    with contextlib.suppress(Exception):
        replay(cfg)
    from cpt.params import flatten

    meta = run_tags(params, layout)
    label, name_tags = pipeline_label(params, str(layout.root), meta.get("mlflow.source.git.commit"))
    all_tags = {**meta, **name_tags, "mlflow.source.name": "prefect", "cpt.flow": name, "cpt.pipeline_label": label,
                **{k: str(v) for k, v in (tags or {}).items()}}
    tracker = MlflowTracker(cfg, run_name=label, tags=all_tags, params=flatten(params))
    tracker.flush(timeout=float(cfg["http_timeout"]))  # the flow needs the run id now, for the stage processes
    return tracker


def main(argv: list[str] | None = None) -> int:
    """``python -m cpt.ops.tracking replay [-p params.yaml] [--root .]``: send spooled runs to the tracking store."""
    import argparse

    from cpt.layout import Layout
    from cpt.params import load_params

    parser = argparse.ArgumentParser(prog="python -m cpt.ops.tracking", description=main.__doc__)
    parser.add_argument("command", choices=["replay"])
    parser.add_argument("-p", "--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    layout = Layout(Path(args.root))
    params_path = Path(args.params) if Path(args.params).is_absolute() else layout.root / args.params
    cfg = settings(load_params(params_path), layout)
    results = replay(cfg)
    for path, ok, msg in results:
        print(f"{'ok  ' if ok else 'FAIL'} {path}: {msg}")
    if not results:
        print(f"nothing to replay in {cfg['spool_dir']}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
