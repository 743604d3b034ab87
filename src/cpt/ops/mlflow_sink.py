"""The sink: applies queued tracking operations to an MLflow store through ``MlflowClient`` (shared by live tracking
and spool replay). mlflow is imported on first use, never at module level."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cpt.ops.run_meta import configure_mlflow_env, param_value

log = logging.getLogger("cpt.ops.tracking")

# MLflow error codes that mean "the store is up and says no" (retrying cannot help), vs outages (5xx, connection).
_PERMANENT = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS",
              "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "PERMISSION_DENIED", "INVALID_REQUEST"}


def permanent(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in _PERMANENT


class Sink:
    """Applies operations to one MLflow store (tracking + registry)."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self._client = None
        self._experiment_id: str | None = None

    @property
    def client(self):
        if self._client is None:
            configure_mlflow_env(self.cfg)
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.cfg["uri"], registry_uri=self.cfg["uri"])
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            name = self.cfg["experiment"]
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                local = not self.cfg["uri"].startswith(("http://", "https://", "databricks"))
                location = Path(self.cfg["artifact_root"]).as_uri() if local else None
                from cpt.ops.mlflow_views import EXPERIMENT_TAGS

                try:
                    self._experiment_id = self.client.create_experiment(name, artifact_location=location,
                                                                        tags=EXPERIMENT_TAGS)
                except Exception:  # noqa: BLE001 - created meanwhile by another process
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def find_parent(self, key: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id()], filter_string=f"tags.`cpt.pipeline_key` = '{key}'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def unique_name(self, label: str) -> str:
        """``label``, or ``label #N`` when N-1 pipeline runs already carry it (tag ``cpt.pipeline_label``): two
        executions of one commit and params are two runs, and their names say which came later."""
        if "'" in label:  # cpt.ops.run_names never makes one; a filter string cannot quote it
            return label
        taken = self.client.search_runs([self.experiment_id()], max_results=1000,
                                        filter_string=f"tags.`cpt.pipeline_label` = '{label}'")
        return label if not taken else f"{label} #{len(taken) + 1}"

    def create_run(self, run_name: str, tags: dict[str, str], start_time: int, params: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id(), start_time=start_time, tags=tags, run_name=run_name)
        self.log_params(run.info.run_id, params, fresh=True)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any], fresh: bool = False) -> None:
        """MLflow params are write-once: a stage re-logging a key with another value (a default it resolved, say)
        would be rejected and, in a batch, take the other params down with it. Keys already there are skipped;
        different values are listed in the tag ``cpt.tracking.param_conflicts``."""
        from mlflow.entities import Param

        wanted = {str(k)[:250]: param_value(v) for k, v in params.items()}
        existing = {} if fresh else self.client.get_run(run_id).data.params
        conflicts = {k: [existing[k], v] for k, v in wanted.items() if k in existing and existing[k] != v}
        items = [Param(k, v) for k, v in wanted.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])
        if conflicts:
            log.warning("tracking: params already logged with other values kept as they were: %s", sorted(conflicts))
            self.set_tags(run_id, {"cpt.tracking.param_conflicts": json.dumps(conflicts, default=str)[:8000]})

    def log_metrics(self, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, v, ts, step) for k, v, ts, step in rows]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k)[:250], str(v)[:8000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, tags=items[i:i + 100])

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(run_id, str(p), artifact_path)
        elif p.exists():
            self.client.log_artifact(run_id, str(p), artifact_path)
        else:
            log.warning("tracking: artifact %s no longer exists; not logged", p)


# ----------------------------------------------------------------------------------------------------------------
