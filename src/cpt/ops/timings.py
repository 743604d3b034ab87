"""Timings out of the results: ``metrics/<stage>.json`` (git, DVC) holds what a stage found, which a rerun on the
same inputs reproduces byte for byte; ``metrics/timings/<stage>.json`` (git-ignored, not a DVC output) holds how
this particular run went: wall seconds, throughput, MFU, whether it resumed. MLflow gets both.

Why a split by key rather than per stage: every stage reports its timings under the same few names, so one rule
keeps them all out of git, and a new stage (or a new timing) follows it without touching DVC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# keys (at any depth) whose values are facts of one run, not results
RUN_KEYS = frozenset({"seconds", "timings", "mfu", "tokens_per_s", "resumed_from", "retrained", "peak_tflops",
                      "engine"})  # engine: workers and CPU seconds of the data stages (cpt.data.engine)
RUN_SUFFIXES = ("_seconds", "_per_s")


def is_timing(key: str) -> bool:
    return key in RUN_KEYS or key.endswith(RUN_SUFFIXES)


def split(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(results, timings)``: nested dicts are split key by key; an emptied sub-dict is dropped from results."""
    results: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    for key, value in metrics.items():
        if is_timing(str(key)):
            timings[key] = value
        elif isinstance(value, dict):
            r, t = split(value)
            if r or not t:
                results[key] = r
            if t:
                timings[key] = t
        else:
            results[key] = value
    return results, timings


def timings_file(layout: Any, stage: str) -> Path:
    return Path(layout.metrics) / "timings" / f"{stage}.json"


def write(layout: Any, stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write ``metrics/<stage>.json`` (results) and ``metrics/timings/<stage>.json`` (this run); returns results."""
    from cpt.io import write_json, write_metrics

    results, run = split(metrics)
    write_metrics(layout.metrics_file(stage), results)
    write_json(timings_file(layout, stage), run)
    return results
