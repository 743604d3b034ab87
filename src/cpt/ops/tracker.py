"""The tracking interface stages see: ``current()`` returns the process-wide tracker (the null tracker unless a
stage runner activated an MLflow one). Kept apart from the MLflow code so that importing it costs nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TrackingUnavailable(RuntimeError):
    """The tracking server could not be reached (the caller decides what that means)."""


# ----------------------------------------------------------------------------------------------------------------
# the null tracker and the process-wide current tracker


class Tracker:
    """The null tracker: every call is accepted and dropped (tracking is off)."""

    active = False
    run_id: str | None = None
    model_name: str | None = None

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

    # what the UI shows (cpt.ops.headline); nothing to show without tracking
    def set_parent_tags(self, tags: dict[str, Any]) -> None:  # noqa: D102
        pass

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:  # noqa: D102
        pass

    def log_image(self, path: str | Path, key: str, step: int = 0, parent: bool = True) -> None:  # noqa: D102
        pass

    def log_inputs(self, datasets: list[dict[str, Any]]) -> None:  # noqa: D102
        pass

    def set_experiment_tags(self, tags: dict[str, Any]) -> None:  # noqa: D102
        pass

    def link(self, parent: bool = True, artifact: str | None = None,  # noqa: D102
             relative: bool = False) -> str | None:
        return None

    def table_link(self) -> str | None:  # noqa: D102
        return None

    def log_parent_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:  # noqa: D102
        pass

    def describe_version(self, version: str, text: str, name: str | None = None,  # noqa: D102
                         tags: dict[str, str] | None = None) -> None:
        pass

    # registry, used by the promotion gate (cpt.ops.gate); the null tracker has no registry
    def get_alias(self, name: str, alias: str) -> dict[str, Any] | None:  # noqa: D102
        return None

    def register_model(self, path: str | Path, tags: dict[str, Any] | None = None,  # noqa: D102
                       name: str | None = None, artifacts: dict[str, str | Path] | None = None) -> str | None:
        return None

    def set_alias(self, name: str, alias: str, version: str) -> None:  # noqa: D102
        pass

    def delete_alias(self, name: str, alias: str) -> None:  # noqa: D102
        pass

    def download_model(self, champion: dict[str, Any]) -> Path | None:
        """A local copy of a registered version's model folder (``get_alias``'s dict), for re-scoring it."""
        return None


_current: Tracker = Tracker()


def current() -> Tracker:
    return _current


def activate(tracker: Tracker) -> Tracker:
    global _current
    _current = tracker
    return tracker
