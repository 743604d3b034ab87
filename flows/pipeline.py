"""The cpt flows: ``data_prep`` (ingest -> ... -> shards), ``train``, ``evaluate`` and ``pipeline`` chaining them.

One Prefect task per stage, named as the stage, and each task is ``dvc repro --single-item <stage>`` (flows/dvc.py):
DVC owns the DAG, the params and the cache, so an unchanged stage is skipped here exactly as in ``dvc repro``.
Prefect adds what DVC lacks:

* retries: the train task retries (``train_retries``) and, since ``train.resume`` is on and ``data/checkpoints`` is
  not a DVC output (DVC leaves it in place), a retry resumes from the last checkpoint instead of starting over;
* one MLflow parent run per pipeline execution: the outermost flow opens it and hands its id to every stage process
  in ``CPT_MLFLOW_RUN_ID``, so each stage is a nested run (cpt.ops.tracking);
* routing and GPU exclusivity: train/evaluate take a Prefect global concurrency slot ``gpu-<CUDA_VISIBLE_DEVICES>``
  (a no-op until ``prefect gcl create gpu-0 --limit 1`` exists), on top of the deployment/work-queue limits;
* moving data between machines: ``pull`` runs ``dvc pull`` of the inputs first, ``push`` sends outputs back;
* a view of the answer: each stage task ends ``Ran``, ``Skipped`` (DVC found it up to date) or ``Re-exported``
  (train / sft found their finished checkpoint: nothing trained), all on the ``pipeline`` flow run's own page (its
  stages are its tasks, not subflows), and ``pipeline`` publishes the markdown artifact ``cpt-pipeline`` (gain /
  forgetting, the gate's decision, the MLflow run).

Run locally without a server: ``python -m flows.pipeline`` (an ephemeral Prefect API is started for the run).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

# A Prefect worker loads this file by path (entrypoint flows/pipeline.py:pipeline): make `flows.*` importable.
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.states import Completed, State

from cpt.ops import tracking
from cpt.io import read_json
from cpt.layout import Layout
from cpt.params import load_params
from cpt.stages import STAGES
from flows.dvc import DvcFailed, run_dvc

DATA_PREP: tuple[str, ...] = ("ingest", "clean", "validate", "base", "tokenizer", "shards")
# what each GPU-side flow needs from the remote (DVC stage names as `dvc pull` targets) and sends back
TRAIN_INPUTS = ("base", "tokenizer", "shards")
EVAL_INPUTS = ("clean", "base", "shards", "train")


def _root(root: str) -> Path:
    path = Path(root).expanduser().resolve()
    if not (path / "dvc.yaml").exists():
        raise FileNotFoundError(f"{path}: no dvc.yaml here; pass root= the cpt project folder")
    return path


def _selected(group: tuple[str, ...], stages: list[str] | None) -> list[str]:
    if stages is None:
        return list(group)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {list(STAGES)}")
    return [s for s in group if s in stages]


def _gpu_slot() -> contextlib.AbstractContextManager:
    """A global concurrency slot per visible GPU: two flows never train on one GPU at once, whichever deployment
    started them. ``strict=False``: without the limit created on the server this is a no-op."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not gpu:
        return contextlib.nullcontext()
    return concurrency(f"gpu-{gpu.replace(',', '-')}", occupy=1, strict=False)


def _run_stage(stage: str, root: str) -> State:
    """``dvc repro --single-item <stage>``; the task's final state says what happened: ``Ran`` or ``Skipped`` (DVC
    found it up to date), both of type COMPLETED, so the flow run page tells them apart at a glance."""
    logger = get_run_logger()
    with _gpu_slot() if stage in ("train", "eval", "downstream", "merge", "sft") else contextlib.nullcontext():
        result = run_dvc(["repro", "--single-item", stage], root, logger=logger)
    metrics_file = Layout(Path(root)).metrics_file(stage)
    metrics = read_json(metrics_file) if metrics_file.exists() else {}
    skipped = result.skipped(stage)
    what = "up to date (DVC skipped it)" if skipped else f"ran in {result.seconds:.1f}s"
    reexported = not skipped and _reexported(Path(root), stage)
    if reexported:
        what = "re-exported the finished checkpoint of an earlier run (nothing trained)"
    logger.info("%s: %s", stage, what)
    data = {"stage": stage, "ran": not skipped, "reexported": reexported, "seconds": result.seconds,
            "metrics": metrics}
    name = "Skipped" if skipped else "Re-exported" if reexported else "Ran"
    return Completed(name=name, message=f"{stage}: {what}", data=data)


def _reexported(root: Path, stage: str) -> bool:
    """train / sft found their run's final checkpoint and only exported it (``retrained: false`` in this run's
    timings, metrics/timings/<stage>.json): the task says so instead of "Ran", and no throughput is quoted."""
    from cpt.ops.timings import timings_file

    path = timings_file(Layout(root), stage)
    run = read_json(path) if path.exists() else {}
    return (run.get("retrained", (run.get("train") or {}).get("retrained")) is False)


# One task per stage, named as the stage. NO_CACHE: DVC is the cache; Prefect result caching would replay a stale
# answer for a stage whose inputs DVC sees as changed.
STAGE_TASKS = {
    stage: task(name=stage, task_run_name=stage, cache_policy=NO_CACHE, persist_result=False,
                retries=0, log_prints=True)(_run_stage)
    for stage in STAGES
}


@task(name="dvc-pull", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=10)
def dvc_pull(root: str, targets: list[str]) -> None:
    """Fetch the stage outputs this machine needs from the DVC remote (missing ones are left to be built)."""
    run_dvc(["pull", "--allow-missing", *targets], root, logger=get_run_logger())


@task(name="dvc-push", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=10)
def dvc_push(root: str, targets: list[str]) -> None:
    """Send the stage outputs to the DVC remote so other machines (and `dvc pull` users) get them."""
    run_dvc(["push", *targets], root, logger=get_run_logger())


@contextlib.contextmanager
def _pipeline_run(root: Path, name: str, enabled: bool, results: list[dict[str, Any]]) -> Iterator[tracking.Tracker]:
    """The MLflow parent run for this execution, unless an outer flow already opened one (then stages nest there).
    ``results`` (filled by the caller) says whether eval ran in THIS execution: only then does the parent get the
    gate's verdict (metrics/gate.json on disk may be from an earlier run)."""
    if not enabled or os.environ.get(tracking.ENV_PARENT):
        yield tracking.Tracker()
        return
    logger = get_run_logger()
    params = load_params(root / "params.yaml")
    tags = {"cpt.flow": name}
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        tags["prefect.flow_run_id"] = str(flow_run.id)
        tags["prefect.flow_run_name"] = str(flow_run.name)
        if flow_run.deployment_id:
            tags["prefect.deployment_id"] = str(flow_run.deployment_id)
    parent = tracking.open_pipeline_run(params, Layout(root), name=name, tags=tags)
    if parent.active and parent.run_id:
        os.environ[tracking.ENV_PARENT] = parent.run_id
        logger.info("MLflow run %s (%s): stages are its nested runs", parent.run_id, parent.cfg["uri"])
    elif parent.active:
        logger.warning("MLflow unreachable at flow start: stages open their own runs (spooled if still down)")
    status = "FAILED"
    try:
        yield parent
        status = "FINISHED"
    finally:
        if parent.run_id and os.environ.get(tracking.ENV_PARENT) == parent.run_id:
            del os.environ[tracking.ENV_PARENT]
        gate = Layout(root).metrics_file("gate")
        if parent.active and gate.exists() and any(r["stage"] == "eval" and r["ran"] for r in results):
            decision = read_json(gate)
            parent.set_tags({"cpt.gate.promoted": decision.get("promoted"), "cpt.gate.reason": decision.get("reason")})
            parent.log_artifact(gate, "metrics")
        parent.close(status=status)


def _state(r: dict[str, Any]) -> str:
    return "skipped (up to date)" if not r["ran"] else "re-exported (nothing trained)" if r.get("reexported") else "ran"


def _summary(results: list[dict[str, Any]], root: Path, link: str | None = None, table: str | None = None) -> str:
    """The flow's answer as markdown: gain / forgetting per language with intervals, the gate's decision and
    thresholds, the MLflow run, then which stages ran and which DVC skipped."""
    from cpt.ops import summary
    from cpt.ops.headline import last_train_trained

    layout = Layout(root)
    lines = ["# cpt pipeline", ""]
    if (layout.metrics / "summary.json").exists():
        gate = read_json(layout.metrics_file("gate")) if layout.metrics_file("gate").exists() else {}
        evaluated = any(r["stage"] == "eval" and r["ran"] for r in results)
        # no throughput when the last train run only re-exported (the MLflow description says the same)
        lines += [summary.markdown(read_json(layout.metrics / "summary.json"), gate, link,
                                   trained=last_train_trained(layout))]
        if not evaluated:
            lines += ["(eval was up to date: these are the numbers of the run that last evaluated this model)", ""]
    elif link:
        lines += [f"MLflow run: {link}", ""]
    if table:
        lines += [f"All pipeline runs, headline columns: {table}", ""]
    lines += ["| stage | state | seconds |", "|---|---|---:|"]
    lines += [f"| {r['stage']} | {_state(r)} | {r['seconds']:.1f} |" for r in results]
    return "\n".join(lines) + "\n"


def _run_stages(stages: list[str], root: Path, train_retries: int = 2, retry_delay: float = 30.0,
                results: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run stages in order; each waits for the previous (DVC's DAG is linear here, and DVC calls are serial).
    ``results`` (appended to as each stage ends) lets the caller see what ran even when a later stage fails."""
    results = [] if results is None else results
    for stage in stages:
        t = STAGE_TASKS[stage]
        if stage == "train":
            t = t.with_options(retries=train_retries, retry_delay_seconds=retry_delay)
        # the task's state is Ran/Skipped (see _run_stage); its data is the stage's result (raises if it failed)
        results.append(t(stage, str(root), return_state=True).result())
    return results


@flow(name="data_prep", log_prints=True)
def data_prep(root: str = ".", stages: list[str] | None = None, set_params: list[str] | None = None,
              push: bool = False, track: bool = True) -> list[dict[str, Any]]:
    """ingest -> clean -> validate -> base -> tokenizer -> shards (``stages`` picks a subset, in pipeline order).
    ``set_params``: ``dvc exp run -S``-style overrides written into params.yaml first."""
    path = _root(root)
    _apply_params(path, set_params)
    selected = _selected(DATA_PREP, stages)
    results: list[dict[str, Any]] = []
    with _pipeline_run(path, "data_prep", track, results):
        results += _run_stages(selected, path)
    if push and selected:
        dvc_push(str(path), selected)
    return results


@flow(name="train", log_prints=True)
def train(root: str = ".", pull: bool = False, push: bool = False, train_retries: int = 2,
          retry_delay: float = 30.0, track: bool = True) -> list[dict[str, Any]]:
    """Continual pretraining (one task, retried after ``retry_delay`` s; a retry resumes from the last checkpoint)."""
    path = _root(root)
    if pull:
        dvc_pull(str(path), list(TRAIN_INPUTS))
    results: list[dict[str, Any]] = []
    with _pipeline_run(path, "train", track, results):
        results += _run_stages(["train"], path, train_retries, retry_delay)
    if push:
        dvc_push(str(path), ["train"])
    return results


@flow(name="evaluate", log_prints=True)
def evaluate(root: str = ".", pull: bool = False, push: bool = False, track: bool = True) -> list[dict[str, Any]]:
    """Eval (base vs cpt, bits per byte) and the promotion gate (metrics/gate.json, registry alias), the downstream
    tasks (lm-eval; the gate rule gate.max_downstream_drop) and merge (the gain-forgetting frontier; the largest merge
    the gate passes, registered)."""
    path = _root(root)
    if pull:
        dvc_pull(str(path), list(EVAL_INPUTS))
    results: list[dict[str, Any]] = []
    with _pipeline_run(path, "evaluate", track, results):
        results += _run_stages(["eval", "downstream", "merge"], path)
    if push:
        dvc_push(str(path), ["eval", "downstream", "merge"])
    return results


@flow(name="pipeline", log_prints=True)
def pipeline(root: str = ".", stages: list[str] | None = None, set_params: list[str] | None = None,
             pull: bool = False, push: bool = False, train_retries: int = 2, retry_delay: float = 30.0,
             track: bool = True) -> list[dict[str, Any]]:
    """The whole chain, every stage a task of this flow run (ingest ... shards, train, eval, downstream, sft), under one MLflow
    parent run. (``data_prep``, ``train`` and ``evaluate`` are the same tasks as flows of their own, for deployments
    that run a part on another machine.)

    ``stages`` runs a subset (in pipeline order); ``pull`` first fetches whatever the DVC remote already has (a GPU
    host then skips the data prep a CPU host did), ``push`` sends every output back at the end.
    """
    path = _root(root)
    _apply_params(path, set_params)
    selected = _selected(STAGES, stages)
    if pull:
        dvc_pull(str(path), [])
    results: list[dict[str, Any]] = []
    with _pipeline_run(path, "pipeline", track, results) as parent:
        # every stage as a task of THIS flow run (not inside data_prep/train/evaluate subflows, which hid their
        # Ran/Skipped states one click down): its page lists each stage and how it ended; results grows as they run
        _run_stages(selected, path, train_retries, retry_delay, results)
    link = parent.link() if parent.active else None
    table = parent.table_link() if parent.active else None
    if push:
        dvc_push(str(path), [])
    create_markdown_artifact(markdown=_summary(results, path, link, table), key="cpt-pipeline",
                             description="cpt pipeline: gain / forgetting, the gate's decision, the MLflow run")
    return results


def _apply_params(root: Path, overrides: list[str] | None) -> None:
    """Write ``section.key=value`` overrides into params.yaml exactly as ``dvc exp run -S`` does (DVC's own Hydra
    override code, which keeps comments), so the run stays reproducible with a plain ``dvc repro`` afterwards."""
    if not overrides:
        return
    from dvc.utils.hydra import apply_overrides

    get_run_logger().info("params.yaml: applying %s", overrides)
    apply_overrides(root / "params.yaml", list(overrides))


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.pipeline [--flow pipeline] [--stages a,b] [-S k=v ...]``: run a flow in-process."""
    import argparse

    flows = {"pipeline": pipeline, "data_prep": data_prep, "train": train, "evaluate": evaluate}
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=main.__doc__)
    parser.add_argument("--flow", choices=list(flows), default="pipeline")
    parser.add_argument("--root", default=".")
    parser.add_argument("--stages", default=None, help="comma-separated subset (data_prep/pipeline)")
    parser.add_argument("-S", "--set", dest="set_params", action="append", default=None)
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {"root": args.root}
    if args.flow in ("pipeline", "data_prep"):
        kwargs["stages"] = args.stages.split(",") if args.stages else None
        kwargs["set_params"] = args.set_params
    try:
        flows[args.flow](**kwargs)
    except DvcFailed as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
