"""``cpt <stage> [-p params.yaml] [-S section.key=value ...]``: one verb per pipeline stage (plus ``cpt train --plan``
and ``cpt export``, cpt.training.commands).

Each verb loads params, runs ``cpt.<stage>.run(params, layout)`` and writes the returned metrics to
``metrics/<stage>.json``. Stage modules are imported lazily so ``cpt --help`` is instant and a stage never pays for
another stage's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from cpt import __version__
from cpt.errors import CptError
from cpt.layout import Layout
from cpt.ops import timings, tracking
from cpt.params import ParamsError, load_params, section, stage_config
from cpt.stages import DESCRIPTIONS, STAGES
from cpt.training import commands

log = logging.getLogger("cpt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpt",
        description="Continual pretraining pipeline. Stages, in pipeline order:\n"
        + "\n".join(f"  {s:<10} {DESCRIPTIONS[s]}" for s in STAGES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cpt {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", title="stages (in pipeline order)")
    for stage in STAGES:
        p = sub.add_parser(stage, help=DESCRIPTIONS[stage], description=DESCRIPTIONS[stage])
        p.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument(
            "-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
            help="override a param (value parsed as YAML); repeatable",
        )
        p.add_argument("--root", default=".", help="project root: data/, metrics/ and reports/ live here")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        if stage == "train":
            commands.add_plan_args(p)
    commands.add_export_parser(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (as logging's own last-resort handler does), so a handler
    installed by one in-process CLI call never holds a stream that was swapped and closed since (pytest capture,
    Prefect's log redirection)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(stage: str, verbose: bool = False) -> None:
    """cpt's loggers at INFO on stderr. The root logger is left alone (WARNING by default), so third-party INFO
    chatter (great-expectations, mlflow, prefect...) stays out of a stage's log in `dvc repro` and Prefect."""
    logger = logging.getLogger("cpt")
    for old in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s cpt {stage}: %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def check_params(stage: str, module, params: dict, layout: Layout) -> None:
    """The stage's own params checks (its ``config``, else its section against its ``DEFAULTS``), before any tracking
    run exists: a typo fails in a second, with "did you mean", and leaves no FAILED run behind in MLflow."""
    config = getattr(module, "config", None) or getattr(module, "_config", None)
    if callable(config):
        config(params)
    elif isinstance(getattr(module, "DEFAULTS", None), dict):
        stage_config(params, stage, module.DEFAULTS)
    if stage == "ingest":  # every source is checked (keys, formats, files) before any work
        from cpt.data.sources import parse_sources

        parse_sources({**module.DEFAULTS, **section(params, "ingest")}, layout)
    if stage == "eval":  # the gate runs after eval, in the same process
        from cpt.ops.gate import gate_params

        gate_params(params)


def run_stage(stage: str, params: dict, layout: Layout) -> dict:
    """Run one stage in-process and write its metrics: results to ``metrics/<stage>.json`` (git, DVC), timings to
    ``metrics/timings/<stage>.json`` (git-ignored), both to MLflow. Used by the CLI and by the Prefect tasks' tests."""
    module = importlib.import_module(f"cpt.stages.{stage}")
    check_params(stage, module, params, layout)
    tracker = tracking.activate(tracking.for_stage(stage, params, layout))
    if tracker.active:  # the clean corpus / the shards it reads, as MLflow datasets with their DVC md5
        from cpt.ops.mlflow_views import stage_datasets

        tracker.log_inputs(stage_datasets(layout.root, stage))
    started = time.perf_counter()
    try:
        metrics = module.run(params, layout) or {}
    except BaseException:
        tracker.close(status="FAILED")
        tracking.activate(tracking.Tracker())
        raise
    metrics.setdefault("seconds", round(time.perf_counter() - started, 3))
    timings.write(layout, stage, metrics)
    try:
        _after_stage(stage, params, layout, metrics, tracker)
    except BaseException:
        tracker.close(status="FAILED", metrics=metrics)
        tracking.activate(tracking.Tracker())
        raise
    tracker.close(status="FINISHED", metrics=metrics)
    tracking.activate(tracking.Tracker())
    return metrics


def _after_stage(stage: str, params: dict, layout: Layout, metrics: dict, tracker: tracking.Tracker) -> None:
    """Post-stage hooks. After eval: the promotion gate (register the model, alias ``champion`` if it earned it,
    write metrics/gate.json), then the headline (metrics/summary.json, the MLflow descriptions); here rather than in
    the eval stage so they run whenever eval runs, tracked or not. After train: the old/new loss chart for MLflow."""
    if stage == "eval":
        from cpt.ops import gate, headline
        from cpt.stages import eval as eval_stage

        # a champion scored on other text is re-scored on this eval's text (or the gate refuses)
        decision = gate.run(params, layout, metrics, tracker,
                            rescore=lambda folder: eval_stage.rescore(params, layout, folder))
        headline.publish(layout, tracker, decision)
    elif stage == "train":
        from cpt.ops import headline

        headline.loss_chart(layout, tracker, metrics)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.stage:
        parser.print_help()
        return 2
    configure_logging(args.stage, args.verbose)
    relaunch = commands.torchrun_argv(list(sys.argv[1:] if argv is None else argv)) if (
        args.stage == "train" and not args.plan) else None
    if relaunch:
        log.info("CPT_TORCHRUN: %s", " ".join(relaunch))
        os.execv(relaunch[0], relaunch)
    root = Path(args.root)
    params_path = Path(getattr(args, "params", "params.yaml"))
    if not params_path.is_absolute() and not params_path.exists():
        params_path = root / params_path
    try:
        if args.stage == "export":  # a verb, not a stage: no params, no metrics file
            commands.run_export(args)
            return 0
        params = load_params(params_path, args.overrides)
        if getattr(args, "plan", False):
            commands.run_plan(args, importlib.import_module("cpt.stages.train").config(params), Layout(root))
            return 0
        metrics = run_stage(args.stage, params, Layout(root))
    except (CptError, ParamsError) as exc:
        print(f"cpt {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cpt {args.stage}: interrupted", file=sys.stderr)
        return 130
    log.info("done in %.1fs; metrics in %s", metrics.get("seconds", 0.0), Layout(root).metrics_file(args.stage))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
