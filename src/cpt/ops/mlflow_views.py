"""What a person sees in the MLflow UI, beyond raw logging: applied by the tracker's queue like any other operation
(so a down server delays them, never fails a stage), and imported only by the tracker's sending thread.

* ``parent_tags``: tags (the description ``mlflow.note.content``, the gate's verdict) on the pipeline's parent run;
* ``parent_artifact``: a file logged into the parent run (the loss chart at full size);
* ``image``: a PNG logged with ``log_image(key=, step=)``, which the run's chart view draws as a chart card (the
  only chart MLflow 3 keeps server-side: line charts that overlay two metrics live in the browser's local storage);
* ``inputs``: datasets (``mlflow.log_input``) whose digest is the DVC md5 of the stage output they name;
* ``experiment_tags``: the experiment's kind (``custom_model_development``: the UI opens the runs table rather than
  the GenAI traces overview), its primary metric, and the saved runs-table view (``headline_view``);
* the links (``run_link``, ``table_link``) open the training view, never GenAI.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("cpt.ops.tracking")

KINDS = frozenset({"parent_tags", "image", "inputs", "experiment_tags", "parent_artifact"})

# MLflow 3's UI opens an experiment on the GenAI overview unless told it is model training
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}

# A saved view of the runs table (MLflow's "share view": the UI reads experiment tag ``mlflow.sharedViewState.<key>``
# when the URL says ``#/experiments/<id>/runs?viewStateShareKey=<key>``). MLflow 3.17's table opens with no metric or
# param column, and past 1,000 metric + param + tag keys (cpt's stages log more) lists none to pick up front: this
# view selects the headline. "Override saved view" on its banner makes it the browser's default.
VIEW_KEY = "cpt-headline"


def headline_view(metric_keys: list[str], param_keys: list[str] = ("train.replay_ratio",)) -> dict[str, str]:
    """The experiment tag holding the runs-table view: newest first, the headline metrics (``summary/...``, no
    interval bounds), the params experiments change most and the gate's decision as columns."""
    cols = ["attributes.`Source`", *(f"params.`{k}`" for k in param_keys),
            *(f"metrics.`{k}`" for k in metric_keys if not k.endswith(("/ci95_lo", "/ci95_hi"))),
            "tags.`cpt.gate.decision`"]
    state = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False,
             "selectedColumns": cols, "runsHiddenMode": "SHOW_ALL"}
    return {f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(state)}


def table_link(uri: str, experiment_id: str | None) -> str:
    """The runs table with the headline view, in the training (not GenAI) view. ``/runs`` in the path: the bare
    experiment page redirects to it and drops ``viewStateShareKey`` on the way."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"


def apply(sink: Any, op: dict[str, Any], run_id: str, parent_run_id: str | None) -> None:
    kind = op["op"]
    if kind == "parent_tags":
        if parent_run_id:
            sink.set_tags(parent_run_id, op["tags"])
    elif kind == "parent_artifact":
        if parent_run_id:
            sink.log_artifact(parent_run_id, op["path"], op["artifact_path"])
    elif kind == "experiment_tags":
        for key, value in op["tags"].items():
            sink.client.set_experiment_tag(sink.experiment_id(), key, str(value))
    elif kind == "image":
        from PIL import Image

        with Image.open(op["path"]) as img:
            img.load()
            for rid in [run_id] + ([parent_run_id] if op.get("parent") and parent_run_id else []):
                sink.client.log_image(rid, img, key=op["key"], step=int(op.get("step") or 0), synchronous=True)
    elif kind == "inputs":
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local",
                                       source=json.dumps({"uri": d["uri"]}), schema=None, profile=d.get("profile")),
                               tags=[InputTag("mlflow.data.context", d["context"])]) for d in op["datasets"]]
        for rid in [run_id] + ([parent_run_id] if parent_run_id else []):
            sink.client.log_inputs(rid, datasets=inputs)


def start_system_metrics(cfg: dict[str, Any], run_id: str) -> Any:
    """CPU/GPU/memory/disk every ``system_metrics_interval`` s into the run (mlflow's own monitor, in its own thread;
    it needs psutil, and pynvml for GPUs). None when it cannot start: the stage goes on without them."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=float(cfg.get("system_metrics_interval", 10)),
                                       tracking_uri=cfg["uri"])
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001
        log.info("tracking: no system metrics (%s)", exc)
        return None


def stop_system_metrics(monitor: Any) -> None:
    if monitor is not None:
        try:
            monitor.finish()
        except Exception:  # noqa: BLE001 - a last sample that could not be sent
            pass


def dvc_outs(root: str | Path) -> dict[str, str]:
    """``{out path: md5}`` of every stage output recorded in dvc.lock ({} without one)."""
    import yaml

    lock = Path(root) / "dvc.lock"
    try:
        data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out: dict[str, str] = {}
    for stage in (data.get("stages") or {}).values():
        for o in stage.get("outs") or []:
            if isinstance(o, dict) and o.get("path") and o.get("md5"):
                out[str(o["path"])] = str(o["md5"])
    return out


# what each stage reads, as MLflow datasets: (dvc out, dataset name, context, profile file)
STAGE_INPUTS: dict[str, tuple[tuple[str, str, str, str | None], ...]] = {
    "shards": (("data/clean", "clean corpus", "tokenization", "data/clean/manifest.json"),),
    "train": (("data/clean", "clean corpus", "source", "data/clean/manifest.json"),
              ("data/shards", "token shards", "training", "data/shards/meta.json")),
}


def stage_datasets(root: str | Path, stage: str) -> list[dict[str, Any]]:
    """The datasets a stage reads, with the DVC md5 that dvc.lock holds for them (what ``dvc status`` compares).
    Outputs dvc.lock does not know yet (a stage run by hand before any ``dvc repro``) are left out."""
    root = Path(root)
    md5 = dvc_outs(root)
    out = []
    for path, name, context, profile_file in STAGE_INPUTS.get(stage, ()):
        if path not in md5:
            continue
        profile = None
        if profile_file and (root / profile_file).exists():
            profile = (root / profile_file).read_text(encoding="utf-8")[:4000]
        out.append({"name": name, "digest": md5[path], "context": context, "uri": str(root / path),
                    "profile": profile})
    return out


def run_link(uri: str, experiment_id: str | None, run_id: str | None, artifact: str | None = None,
             relative: bool = False) -> str | None:
    """A link to the run (or one of its artifacts: the artifacts view shows an image at full size) in the MLflow UI
    (http stores), else how to open it (``mlflow ui`` on a local store). Always ``?workflowType=machine_learning``:
    without it MLflow 3 opens a run in whichever mode the browser used last, GenAI in a fresh one. ``relative``: the
    ``#/...`` page alone, for a link inside an MLflow description (it works at whatever address the UI is)."""
    if not run_id:
        return None
    tab = f"/artifacts/{artifact}" if artifact else ""
    page = f"#/experiments/{experiment_id}/runs/{run_id}{tab}?workflowType=machine_learning"
    if relative:
        return page
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"http://127.0.0.1:5000/{page} (after `mlflow ui --host 127.0.0.1 --backend-store-uri {uri}`)"
