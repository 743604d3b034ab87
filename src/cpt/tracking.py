"""Experiment tracking at the edge of the library.

Stages talk to ``cpt.tracking.current()`` only: ``log_metrics``, ``log_params``, ``log_artifact``, ``set_tags``.
Without mlflow installed, or with ``tracking.enabled: false`` (or ``CPT_TRACKING=0``), that is the null tracker and
costs nothing; the training path therefore runs with only torch + transformers installed.

The MLflow tracker (chosen by ``for_stage``) never lets a down or slow tracking server kill a stage:

* every call only appends an operation to an in-memory queue; a daemon thread sends the queue in batches every
  ``flush_interval`` seconds (``log_batch``), so a training step never waits on the network;
* HTTP calls use short timeouts and no retries (``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``_MAX_RETRIES`` from params
  unless already set); a failure keeps the queue and retries later, in order, so nothing is lost or reordered;
* ``close`` retries for ``close_timeout`` seconds; what still could not be sent is written to a JSONL spool file
  (``tracking.spool_dir``, with copies of the artifacts), and the next ``cpt`` stage (or
  ``python -m cpt.tracking replay``) replays it into the same run and tags the run with what arrived late.

Run layout, one MLflow run per pipeline execution with one nested run per stage:

* a Prefect flow opens the parent run and hands its id to the stage processes in ``CPT_MLFLOW_RUN_ID``;
* under ``dvc exp run`` (``DVC_EXP_NAME`` set by DVC) the stages share a parent named after the experiment;
* under a plain ``dvc repro`` the stages share a parent keyed by (git commit, params hash).

The stage's final metrics are logged to its run and, prefixed ``<stage>/``, to the parent, so the MLflow UI can
compare pipeline runs directly; per-step metrics (``loss/new`` ...) go to both as they are.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("cpt.tracking")

ENV_PARENT = "CPT_MLFLOW_RUN_ID"
ENV_SWITCH = "CPT_TRACKING"  # "0"/"false"/"off" turns tracking off whatever params say

DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "uri": "sqlite:///mlflow.db",  # MLFLOW_TRACKING_URI wins; a relative sqlite path is relative to the project root
    "artifact_root": "mlartifacts",  # for sqlite/file stores; a server stores artifacts itself (--serve-artifacts)
    "experiment": "cpt",
    "model_name": "cpt",  # registered model name (the gate aliases its versions)
    "log_model": True,  # log data/models/cpt into the eval run and register it
    "group_stages": True,  # plain `dvc repro`: stages of one (commit, params) share a parent run
    "mirror_to_parent": True,  # per-step metrics also go to the parent run
    "http_timeout": 5,  # seconds per HTTP request to a tracking server
    "http_retries": 0,  # retries per request inside mlflow; cpt retries the whole queue itself
    "flush_interval": 5.0,  # seconds between background sends
    "close_timeout": 10.0,  # seconds close() keeps retrying before spooling to disk
    "spool_dir": "data/tracking_spool",
}

# Reports each stage writes (docs/architecture.md); logged as artifacts when the stage closes, with metrics/<stage>.json.
STAGE_ARTIFACTS: dict[str, tuple[str, ...]] = {
    "ingest": ("data/raw/manifest.json",),
    "clean": ("data/clean/manifest.json",),
    "validate": ("reports/data_docs",),
    "base": ("data/base/cpt_base.json", "data/base/config.json"),
    "tokenizer": ("reports/fertility.md", "data/tokenizer/new_tokens.json"),
    "shards": ("data/shards/meta.json",),
    "train": ("metrics/train_curve.csv",),
    "eval": (),  # the eval stage logs reports/eval/* itself (artifact folder eval/)
}


LAST_STAGE = "eval"  # a grouped parent run is FINISHED when this stage finishes (FAILED when any stage fails)


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

    # registry, used by the promotion gate (cpt.gate); the null tracker has no registry
    def get_alias(self, name: str, alias: str) -> dict[str, Any] | None:  # noqa: D102
        return None

    def register_model(self, path: str | Path, tags: dict[str, Any] | None = None) -> str | None:  # noqa: D102
        return None

    def set_alias(self, name: str, alias: str, version: str) -> None:  # noqa: D102
        pass


_current: Tracker = Tracker()


def current() -> Tracker:
    return _current


def activate(tracker: Tracker) -> Tracker:
    global _current
    _current = tracker
    return tracker


# ----------------------------------------------------------------------------------------------------------------
# settings and run metadata


def settings(params: dict[str, Any], layout: Any) -> dict[str, Any]:
    """The ``tracking`` section with defaults, the env overrides applied and paths resolved."""
    sec = params.get("tracking") or {}
    cfg = {**DEFAULTS, **(sec if isinstance(sec, dict) else {})}
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "false", "off", "no"):
        cfg["enabled"] = False
    uri = os.environ.get("MLFLOW_TRACKING_URI") or str(cfg["uri"])
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(layout.resolve(uri[len("sqlite:///"):]))
    cfg["uri"] = uri
    cfg["artifact_root"] = str(layout.resolve(cfg["artifact_root"]))
    cfg["spool_dir"] = str(layout.resolve(cfg["spool_dir"]))
    cfg["root"] = str(layout.root)
    return cfg


def _configure_mlflow_env(cfg: dict[str, Any]) -> None:
    """Short timeouts before mlflow reads them (user-set env vars win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(cfg["http_timeout"])))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(cfg["http_retries"])))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _git(root: str, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def params_hash(params: dict[str, Any]) -> str:
    """Hash of the params that shape results (the tracking section does not)."""
    shaped = {k: v for k, v in params.items() if k != "tracking"}
    return hashlib.sha256(json.dumps(shaped, sort_keys=True, default=str).encode()).hexdigest()


def _device_tag() -> str:
    torch = sys.modules.get("torch")  # only ask torch if the stage already imported it (it costs seconds)
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_available():
                return f"cuda:{torch.cuda.get_device_name(0)}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"cpu (CUDA_VISIBLE_DEVICES={visible})" if visible else "cpu"


def _base_model(params: dict[str, Any], layout: Any) -> str:
    meta = Path(layout.base) / "cpt_base.json"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return str(json.loads(meta.read_text(encoding="utf-8")).get("source"))
    base = params.get("base") or {}
    for key in ("source", "model", "name", "id"):
        if isinstance(base, dict) and base.get(key):
            return str(base[key])
    return "unknown"


def run_tags(params: dict[str, Any], layout: Any) -> dict[str, str]:
    """Provenance every run carries: git commit (+dirty), dvc.lock hash, base model, device, DVC experiment."""
    root = str(layout.root)
    tags = {"mlflow.user": _safe_user(), "mlflow.source.type": "LOCAL", "cpt.params_hash": params_hash(params)[:12],
            "cpt.base_model": _base_model(params, layout), "cpt.device": _device_tag()}
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["cpt.git.dirty"] = str(bool(_git(root, "status", "--porcelain", "--untracked-files=no")))
    lock = Path(root) / "dvc.lock"
    tags["cpt.dvc_lock"] = hashlib.sha256(lock.read_bytes()).hexdigest()[:12] if lock.exists() else "none"
    if os.environ.get("DVC_EXP_NAME"):
        tags["cpt.dvc_exp"] = os.environ["DVC_EXP_NAME"]
        tags["cpt.dvc_exp_baseline"] = os.environ.get("DVC_EXP_BASELINE_REV", "")
    return tags


def _safe_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


_NAME_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


def metric_name(key: str) -> str:
    return _NAME_BAD.sub("_", key)[:250]


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested stage metrics -> ``{"a/b": float}``; non-numbers and non-finite values are left out (MLflow can't
    plot them; the JSON file keeps them)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, name + "/"))
        elif isinstance(value, bool):
            out[metric_name(name)] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[metric_name(name)] = float(value)
    return out


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 6000 else text[:5990] + "...[cut]"


def _now_ms() -> int:
    return int(time.time() * 1000)


# ----------------------------------------------------------------------------------------------------------------
# the sink: applies queued operations to an MLflow store (shared by live tracking and spool replay)


class _Sink:
    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self._client = None
        self._experiment_id: str | None = None

    @property
    def client(self):
        if self._client is None:
            _configure_mlflow_env(self.cfg)
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
                try:
                    self._experiment_id = self.client.create_experiment(name, artifact_location=location)
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

    def create_run(self, run_name: str, tags: dict[str, str], start_time: int, params: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id(), start_time=start_time, tags=tags, run_name=run_name)
        self.log_params(run.info.run_id, params, fresh=True)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any], fresh: bool = False) -> None:
        """MLflow params are write-once: a stage re-logging a key with another value (a default it resolved, say)
        would be rejected and, in a batch, take the other params down with it. Keys already there are skipped;
        different values are listed in the tag ``cpt.tracking.param_conflicts``."""
        from mlflow.entities import Param

        wanted = {str(k)[:250]: _param_value(v) for k, v in params.items()}
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
# the MLflow tracker


class MlflowTracker(Tracker):
    """One MLflow run, fed through an ordered operation queue (see the module docstring)."""

    active = True

    def __init__(self, cfg: dict[str, Any], *, run_name: str, tags: dict[str, str], params: dict[str, Any],
                 stage: str | None = None, parent_run_id: str | None = None, parent: dict[str, Any] | None = None,
                 start_thread: bool = True, replay_first: bool = False):
        self.cfg = cfg
        self.stage = stage
        self.model_name = cfg["model_name"]
        self.run_id: str | None = None
        self.parent_run_id = parent_run_id
        self._grouped = parent is not None  # we share (and so keep the status of) a grouped parent run
        self._sink = _Sink(cfg)
        self._ops: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # guards _ops
        self._io = threading.RLock()  # one sender at a time (the flusher thread or the caller)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failures: list[str] = []  # outages seen, noted in the run when it is back
        self._dropped: list[str] = []  # operations the store refused (noted in the run at its end)
        self._next_try = 0.0
        self._closed = False
        self._enqueue({"op": "start", "run_name": run_name, "tags": tags, "params": params,
                       "parent_run_id": parent_run_id, "parent": parent, "start_time": _now_ms()})
        self._replay_first = replay_first
        self._thread = None
        if start_thread:
            self._thread = threading.Thread(target=self._loop, name="cpt-tracking", daemon=True)
            self._thread.start()

    # -- the Tracker interface: enqueue only --
    def log_params(self, params: dict[str, Any]) -> None:
        self._enqueue({"op": "params", "params": dict(params)})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        rows = flatten_metrics(metrics)
        if rows:
            self._enqueue({"op": "metrics", "metrics": rows, "step": int(step or 0), "ts": _now_ms(),
                           "mirror": bool(self.cfg["mirror_to_parent"])})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._enqueue({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._enqueue({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def close(self, status: str = "FINISHED", metrics: dict[str, Any] | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if metrics:
            rows = flatten_metrics(metrics)
            self._enqueue({"op": "metrics", "metrics": rows, "step": 0, "ts": _now_ms(), "mirror": False})
            if self.stage:
                self._enqueue({"op": "parent_metrics", "metrics": flatten_metrics(metrics, f"{self.stage}/"),
                               "ts": _now_ms()})
        if self.stage:
            root = Path(self.cfg["root"])
            for rel in (f"metrics/{self.stage}.json", *STAGE_ARTIFACTS.get(self.stage, ())):
                if (root / rel).exists():
                    folder = str(Path(rel).parent) if Path(rel).parent != Path(".") else None
                    self.log_artifact(root / rel, rel if (root / rel).is_dir() else folder)
        self._enqueue({"op": "end", "status": status, "end_time": _now_ms()})
        if self._grouped and (status != "FINISHED" or self.stage == LAST_STAGE):
            self._enqueue({"op": "parent_status", "status": status, "end_time": _now_ms()})
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=float(self.cfg["http_timeout"]) + 5)
        deadline = time.monotonic() + float(self.cfg["close_timeout"])
        while True:
            self._next_try = 0.0
            if self._try_drain() or time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if self._pending():
            path = self._spool()
            log.warning("tracking: %s unreachable; %d operations of run %s spooled to %s (replayed by the next "
                        "stage or `python -m cpt.tracking replay`)", self.cfg["uri"], len(self._ops),
                        self.run_id or "(not created yet)", path)
        elif self._failures:
            log.info("tracking: %d send failures during the run; everything arrived late but complete",
                     len(self._failures))

    # -- registry (synchronous: the gate needs the answers) --
    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued now; True when the queue is empty."""
        deadline = time.monotonic() + (float(self.cfg["close_timeout"]) if timeout is None else timeout)
        while True:
            self._next_try = 0.0
            if self._try_drain() or time.monotonic() >= deadline:
                return not self._pending()
            time.sleep(0.5)

    def get_alias(self, name: str, alias: str) -> dict[str, Any] | None:
        from mlflow.exceptions import MlflowException

        with self._io:
            try:
                version = self._sink.client.get_model_version_by_alias(name, alias)
            except MlflowException as exc:
                if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                    return None
                raise
        try:
            sources = json.loads(version.tags.get("cpt.gate.sources", "{}"))
        except ValueError:
            sources = {}
        return {"version": str(version.version), "run_id": version.run_id, "sources": sources}

    def register_model(self, path: str | Path, tags: dict[str, Any] | None = None) -> str | None:
        """Log the HF model folder into this run (``model/``) and register it as a new version of ``model_name``."""
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
            try:
                client.create_registered_model(self.model_name, description="cpt continually pretrained models; "
                                               "alias 'champion' = the version that passed the promotion gate")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            source = client.get_run(self.run_id).info.artifact_uri.rstrip("/") + "/model"
            tag_strs = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (tags or {}).items()}
            version = client.create_model_version(self.model_name, source, run_id=self.run_id, tags=tag_strs)
        self.set_tags({"cpt.registered_model": f"{self.model_name}/{version.version}"})
        return str(version.version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        with self._io:
            self._sink.client.set_registered_model_alias(name, alias, version)

    # -- queue machinery --
    def _enqueue(self, op: dict[str, Any]) -> None:
        with self._lock:
            self._ops.append(op)

    def _pending(self) -> bool:
        with self._lock:
            return bool(self._ops)

    def _loop(self) -> None:
        # Importing mlflow and creating the run cost seconds (4-5 s cold on 2 cores): they happen here, overlapped
        # with the stage's own start-up, not in front of it.
        if self._replay_first:
            with contextlib.suppress(Exception):
                replay(self.cfg)
        self._try_drain()
        while not self._stop.is_set():
            self._wake.wait(float(self.cfg["flush_interval"]))
            self._wake.clear()
            if self._stop.is_set():
                return
            self._try_drain()

    def _try_drain(self) -> bool:
        """Send queued ops in order; stop at the first failure (kept for later). True when the queue is empty."""
        if time.monotonic() < self._next_try:
            return not self._pending()
        with self._io:
            with self._lock:
                pending = list(self._ops)
            done = 0
            try:
                while done < len(pending):
                    try:
                        done += self._apply(pending, done)
                    except Exception as exc:  # noqa: BLE001
                        if not _permanent(exc) or pending[done]["op"] == "start":
                            raise
                        # the store answered and refused this one op (bad name, value...): retrying cannot help,
                        # and it must not hold back the ops behind it
                        log.warning("tracking: the store rejected a %r operation (%s); dropped", pending[done]["op"],
                                    str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
                        self._dropped.append(f"{pending[done]['op']}: {str(exc)[:200]}")
                        done += 1
            except Exception as exc:  # noqa: BLE001 - any store failure: keep the rest, back off
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                if not self._failures or self._failures[-1] != msg:
                    log.warning("tracking: send failed (%s); %d operations kept, the stage goes on", msg,
                                len(pending) - done)
                self._failures.append(msg)
                self._next_try = time.monotonic() + float(self.cfg["flush_interval"])
            finally:
                with self._lock:
                    del self._ops[:done]
                    empty = not self._ops
            return empty

    def _apply(self, ops: list[dict[str, Any]], i: int) -> int:
        """Apply ops[i] (and the consecutive metric ops after it, as one batch); return how many were applied."""
        op = ops[i]
        kind = op["op"]
        sink = self._sink
        if kind == "start":
            self._start(op)
            return 1
        if self.run_id is None:
            raise TrackingUnavailable("run not created")
        if kind == "metrics":
            rows, parent_rows, n = [], [], 0
            while i + n < len(ops) and ops[i + n]["op"] == "metrics" and len(rows) < 900:
                m = ops[i + n]
                batch = [(k, v, m["ts"], m["step"]) for k, v in m["metrics"].items()]
                rows += batch
                if m.get("mirror") and self.parent_run_id:
                    parent_rows += batch
                n += 1
            sink.log_metrics(self.run_id, rows)
            if parent_rows:
                sink.log_metrics(self.parent_run_id, parent_rows)
            return n
        if kind == "parent_metrics":
            if self.parent_run_id:
                sink.log_metrics(self.parent_run_id, [(k, v, op["ts"], 0) for k, v in op["metrics"].items()])
        elif kind == "params":
            sink.log_params(self.run_id, op["params"])
        elif kind == "tags":
            sink.set_tags(self.run_id, op["tags"])
        elif kind == "artifact":
            sink.log_artifact(self.run_id, op["path"], op["artifact_path"])
        elif kind == "end":
            if self._dropped:
                sink.set_tags(self.run_id, {"cpt.tracking.dropped": "; ".join(self._dropped)[:8000]})
            if self._failures:
                sink.set_tags(self.run_id, {"cpt.tracking.late": f"{len(self._failures)} send failures; buffered "
                                            f"operations arrived late. First: {self._failures[0][:500]}"})
            sink.client.set_terminated(self.run_id, op["status"], end_time=op["end_time"])
        elif kind == "parent_status":
            if self.parent_run_id:
                if op["status"] == "RUNNING":
                    sink.client.update_run(self.parent_run_id, status="RUNNING")
                else:
                    sink.client.set_terminated(self.parent_run_id, op["status"], end_time=op["end_time"])
        elif kind == "note":
            sink.set_tags(self.run_id, op["tags"])
        return 1

    def _start(self, op: dict[str, Any]) -> None:
        sink = self._sink
        if self.run_id is not None:
            return
        parent_id = op.get("parent_run_id")
        parent = op.get("parent")
        if parent_id is None and parent:  # grouped stages: find or create the shared parent run
            parent_id = sink.find_parent(parent["key"])
            if parent_id is None:
                parent_id = sink.create_run(parent["name"], {**parent["tags"], "cpt.pipeline_key": parent["key"]},
                                            op["start_time"], parent["params"])
            else:
                sink.client.update_run(parent_id, status="RUNNING")
        tags = dict(op["tags"])
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        self.run_id = sink.create_run(op["run_name"], tags, op["start_time"], op["params"])
        self.parent_run_id = parent_id

    # -- spool (disk) --
    def _spool(self) -> Path:
        spool = Path(self.cfg["spool_dir"])
        stamp = time.strftime("%Y%m%dT%H%M%S")
        name = f"{stamp}-{self.stage or 'run'}-{uuid.uuid4().hex[:8]}"
        files = spool / f"{name}.files"
        with self._lock:
            ops = list(self._ops)
        out_ops = []
        for n, op in enumerate(ops):
            if op["op"] == "artifact" and Path(op["path"]).exists():
                # copy: the file may change before the replay, and the run must get what the stage produced
                dest = files / str(n) / Path(op["path"]).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                if Path(op["path"]).is_dir():
                    shutil.copytree(op["path"], dest)
                else:
                    shutil.copy2(op["path"], dest)
                op = {**op, "path": str(dest)}
            out_ops.append(op)
        from cpt.io import atomic_open

        path = spool / f"{name}.jsonl"
        header = {"spool": 1, "uri": self.cfg["uri"], "experiment": self.cfg["experiment"], "run_id": self.run_id,
                  "parent_run_id": self.parent_run_id, "stage": self.stage, "failures": self._failures[-5:],
                  "spooled_at": _now_ms()}
        with atomic_open(path) as fh:
            for row in (header, *out_ops):
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        return path


# ----------------------------------------------------------------------------------------------------------------
# spool replay


def replay(cfg: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Send every spooled run to the tracking store; a replayed file is deleted. Returns (file, ok, message)."""
    spool = Path(cfg["spool_dir"])
    if not spool.is_dir():
        return []
    files = sorted(spool.glob("*.jsonl"))
    if not files:
        return []
    import fcntl

    results = []
    with open(spool / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return [(str(spool), False, "another process is replaying")]
        for path in files:
            lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
            header, ops = lines[0], lines[1:]
            # the store configured now (a moved server keeps its runs); the experiment the run was meant for
            rcfg = {**cfg, "experiment": header.get("experiment") or cfg["experiment"], "close_timeout": 0.0}
            tr = MlflowTracker.__new__(MlflowTracker)
            Tracker.__init__(tr)
            tr.cfg, tr.stage, tr.model_name = rcfg, header.get("stage"), rcfg["model_name"]
            tr.run_id, tr.parent_run_id = header.get("run_id"), header.get("parent_run_id")
            tr._sink, tr._lock, tr._io = _Sink(rcfg), threading.Lock(), threading.RLock()
            tr._failures, tr._next_try, tr._closed, tr._thread, tr._grouped = [], 0.0, True, None, False
            tr._dropped = []
            note = {"cpt.tracking.replayed": f"{len(ops)} operations from spool {path.name} "
                                             f"(spooled after: {'; '.join(header.get('failures') or [])[:1000]})"}
            # the note goes right after the run exists (before 'end'), so a replay that stops halfway still says so
            at = next((i + 1 for i, op in enumerate(ops) if op["op"] == "start"), 0)
            tr._ops = ops[:at] + [{"op": "note", "tags": note}] + ops[at:]
            if tr._try_drain():
                shutil.rmtree(path.with_suffix(".files"), ignore_errors=True)
                path.unlink()
                results.append((str(path), True, f"replayed into run {tr.run_id}"))
                log.info("tracking: replayed %s into run %s", path.name, tr.run_id)
            else:
                # keep what is left (and where the run is now) for the next try
                rest = [{**header, "run_id": tr.run_id, "parent_run_id": tr.parent_run_id}, *tr._ops]
                from cpt.io import atomic_open

                with atomic_open(path) as fh:
                    for row in rest:
                        fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                results.append((str(path), False, (tr._failures or ["unknown"])[-1]))
                break  # the store is down: the rest would fail the same way
    return results


# ----------------------------------------------------------------------------------------------------------------
# entry points


# MLflow error codes that mean "the store is up and says no" (retrying cannot help), vs outages (5xx, connection).
_PERMANENT = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS",
              "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "PERMISSION_DENIED", "INVALID_REQUEST"}


def _permanent(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in _PERMANENT


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
    _configure_mlflow_env(cfg)
    from cpt.params import flatten

    tags = {**run_tags(params, layout), "cpt.stage": stage, "mlflow.source.name": f"cpt {stage}"}
    flat = flatten(params)
    parent_run_id = os.environ.get(ENV_PARENT) or None
    parent = None
    if parent_run_id is None:
        if os.environ.get("DVC_EXP_NAME"):
            key = f"exp:{os.environ['DVC_EXP_NAME']}:{os.environ.get('DVC_EXP_BASELINE_REV', '')[:12]}"
            name = f"dvc exp {os.environ['DVC_EXP_NAME']}"
        elif cfg["group_stages"]:
            key = f"repro:{(tags.get('mlflow.source.git.commit') or 'nogit')[:12]}:{tags['cpt.params_hash']}"
            name = f"dvc repro {key.split(':')[1][:7]}-{tags['cpt.params_hash'][:7]}"
        else:
            key = None
        if key:
            ptags = {k: v for k, v in tags.items() if k not in ("cpt.stage", "mlflow.source.name")}
            parent = {"key": key, "name": name, "tags": {**ptags, "mlflow.source.name": "dvc"}, "params": flat}
    return MlflowTracker(cfg, run_name=stage, tags=tags, params=flat, stage=stage, parent_run_id=parent_run_id,
                         parent=parent, replay_first=Path(cfg["spool_dir"]).is_dir())


def open_pipeline_run(params: dict[str, Any], layout: Any, name: str, tags: dict[str, Any] | None = None) -> Tracker:
    """The parent run of one pipeline execution (opened by the Prefect flow). Its ``run_id`` (None if the store is
    down at that moment) goes to the stage processes in ``CPT_MLFLOW_RUN_ID``; ``close(status)`` ends it."""
    cfg = settings(params, layout)
    if not cfg["enabled"] or not _mlflow_importable():
        return Tracker()
    _configure_mlflow_env(cfg)
    with contextlib.suppress(Exception):
        replay(cfg)
    from cpt.params import flatten

    all_tags = {**run_tags(params, layout), "mlflow.source.name": "prefect", **{k: str(v) for k, v in
                                                                                 (tags or {}).items()}}
    tracker = MlflowTracker(cfg, run_name=name, tags=all_tags, params=flatten(params))
    tracker.flush(timeout=float(cfg["http_timeout"]))  # the flow needs the run id now, for the stage processes
    return tracker


def main(argv: list[str] | None = None) -> int:
    """``python -m cpt.tracking replay [-p params.yaml] [--root .]``: send spooled runs to the tracking store."""
    import argparse

    from cpt.layout import Layout
    from cpt.params import load_params

    parser = argparse.ArgumentParser(prog="python -m cpt.tracking", description=main.__doc__)
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
