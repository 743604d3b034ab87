"""The model registry side of ``MlflowTracker``: version descriptions, aliases (the gate's ``champion``),
registering an HF model folder, and downloading a champion to re-score it. A mixin: it runs on the tracker's own
client and lock, after the tracker's queue is flushed."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from cpt.ops.tracker import TrackingUnavailable


class RegistryMixin:
    """Registry calls for ``MlflowTracker`` (needs its ``cfg``, ``_sink``, ``_io``, ``run_id``, ``flush``, ``set_tags``)."""

    def describe_version(self, version: str, text: str, name: str | None = None,
                         tags: dict[str, str] | None = None) -> None:
        """The model version's description (what the registry page shows first) and tags, of ``name`` (default
        ``tracking.model_name``; the sft stage's model has its own name)."""
        name = name or self.model_name
        with self._io:
            self._sink.client.update_model_version(name, version, description=text)
            for key, value in (tags or {}).items():
                self._sink.client.set_model_version_tag(name, version, key, value)

    def get_alias(self, name: str, alias: str) -> dict[str, Any] | None:
        from mlflow.exceptions import MlflowException

        with self._io:
            try:
                version = self._sink.client.get_model_version_by_alias(name, alias)
            except MlflowException as exc:
                if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                    return None
                raise
        return {"version": str(version.version), "run_id": version.run_id, "sources": self._gate_sources(version)}

    def _gate_sources(self, version: Any) -> dict[str, Any]:
        """The champion's per-source bpb: the ``gate/sources.json`` artifact of its eval run (older versions: the
        ``cpt.gate.sources`` tag)."""
        import tempfile

        with contextlib.suppress(Exception), tempfile.TemporaryDirectory() as tmp, self._io:
            path = self._sink.client.download_artifacts(version.run_id, "gate/sources.json", tmp)
            return json.loads(Path(path).read_text(encoding="utf-8"))
        try:
            return json.loads(version.tags.get("cpt.gate.sources", "{}"))
        except ValueError:
            return {}

    def register_model(self, path: str | Path, tags: dict[str, Any] | None = None, name: str | None = None,
                       artifacts: dict[str, str | Path] | None = None) -> str | None:
        """Log the HF model folder into this run (``model/``) and register it as a new version of ``name``
        (default: ``tracking.model_name``; the sft stage registers its model under its own name); ``artifacts``
        ({folder: file}) are logged with it (the gate's per-source numbers: ``gate/sources.json``)."""
        name = name or self.model_name
        if not self.cfg["log_model"]:
            return None
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no HF model folder (config.json missing); nothing to register")
        if not self.flush(timeout=float(self.cfg["close_timeout"])) or self.run_id is None:
            raise TrackingUnavailable(f"{self.cfg['uri']}: run not created yet (tracking store unreachable)")
        from mlflow.exceptions import MlflowException

        with self._io:
            client = self._sink.client
            client.log_artifacts(self.run_id, str(path), "model")
            for folder, file in (artifacts or {}).items():
                client.log_artifact(self.run_id, str(file), folder)
            try:
                client.create_registered_model(name, description="cpt models (tracking.model_name: continually "
                                               "pretrained; sft.model_name: instruction-tuned); alias 'champion' = "
                                               "the version that passed the promotion gate")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            source = client.get_run(self.run_id).info.artifact_uri.rstrip("/") + "/model"
            tag_strs = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (tags or {}).items()}
            version = client.create_model_version(name, source, run_id=self.run_id, tags=tag_strs)
        self.set_tags({"cpt.registered_model": f"{name}/{version.version}"})
        return str(version.version)

    def download_model(self, champion: dict[str, Any]) -> Path | None:
        """The champion's logged model folder (``model/`` of its run), downloaded to a temp folder, so the gate can
        re-score it on the candidate's eval set."""
        import tempfile

        run_id = champion.get("run_id")
        if not run_id:
            return None
        dest = Path(tempfile.mkdtemp(prefix=f"cpt-champion-v{champion.get('version')}-"))
        with self._io:
            return Path(self._sink.client.download_artifacts(run_id, "model", str(dest)))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        with self._io:
            self._sink.client.set_registered_model_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        """The downstream rule's demotion when no earlier champion exists (cpt.ops.downstream_gate)."""
        with self._io:
            self._sink.client.delete_registered_model_alias(name, alias)

    # -- queue machinery --
