"""``MlflowTracker``: one MLflow run fed through an ordered in-memory queue, sent by a daemon thread, spooled to disk
when the store stays down (see ``cpt.ops.tracking`` for the whole design)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from cpt.ops import mlflow_views, spool
from cpt.ops.mlflow_registry import RegistryMixin
from cpt.ops.mlflow_sink import Sink, permanent
from cpt.ops.run_meta import STAGE_ARTIFACTS, flatten_metrics, now_ms
from cpt.ops.tracker import Tracker, TrackingUnavailable

log = logging.getLogger("cpt.ops.tracking")


class MlflowTracker(RegistryMixin, Tracker):
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
        self._sink = Sink(cfg)
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
                       "parent_run_id": parent_run_id, "parent": parent, "start_time": now_ms()})
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
            self._enqueue({"op": "metrics", "metrics": rows, "step": int(step or 0), "ts": now_ms(),
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
            self._enqueue({"op": "metrics", "metrics": rows, "step": 0, "ts": now_ms(), "mirror": False})
        if self.stage:
            root = Path(self.cfg["root"])
            for rel in (f"metrics/{self.stage}.json", *STAGE_ARTIFACTS.get(self.stage, ())):
                if (root / rel).exists():
                    folder = str(Path(rel).parent) if Path(rel).parent != Path(".") else None
                    self.log_artifact(root / rel, rel if (root / rel).is_dir() else folder)
        self._enqueue({"op": "end", "status": status, "end_time": now_ms()})
        if self._grouped:
            # after every stage, not only the last: `dvc repro train` ends there, and a parent left RUNNING
            # would stay so forever (the next stage of the same pipeline sets it RUNNING again)
            self._enqueue({"op": "parent_status", "status": status, "end_time": now_ms()})
        mlflow_views.stop_system_metrics(getattr(self, "_monitor", None))
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
                        "stage or `python -m cpt.ops.tracking replay`)", self.cfg["uri"], len(self._ops),
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

    # -- what the UI shows (cpt.ops.mlflow_views): queued like everything else --
    def set_parent_tags(self, tags: dict[str, Any]) -> None:
        self._enqueue({"op": "parent_tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        self._enqueue({"op": "parent_metrics", "metrics": flatten_metrics(metrics), "ts": now_ms()})

    def log_image(self, path: str | Path, key: str, step: int = 0, parent: bool = True) -> None:
        self._enqueue({"op": "image", "path": str(Path(path).resolve()), "key": key, "step": step, "parent": parent})

    def log_inputs(self, datasets: list[dict[str, Any]]) -> None:
        if datasets:
            self._enqueue({"op": "inputs", "datasets": datasets})

    def set_experiment_tags(self, tags: dict[str, Any]) -> None:
        self._enqueue({"op": "experiment_tags", "tags": dict(tags)})

    def link(self, parent: bool = True, artifact: str | None = None, relative: bool = False) -> str | None:
        from cpt.ops.mlflow_views import run_link

        with contextlib.suppress(Exception):
            return run_link(self.cfg["uri"], self._sink.experiment_id(),
                            (self.parent_run_id if parent else None) or self.run_id, artifact, relative)
        return None

    def table_link(self) -> str | None:
        from cpt.ops.mlflow_views import table_link

        with contextlib.suppress(Exception):
            return table_link(self.cfg["uri"], self._sink.experiment_id())
        return None

    def log_parent_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._enqueue({"op": "parent_artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

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
                        if not permanent(exc) or pending[done]["op"] == "start":
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
        elif kind in mlflow_views.KINDS:
            mlflow_views.apply(sink, op, self.run_id, self.parent_run_id)
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
                parent_id = sink.create_run(sink.unique_name(parent["name"]),
                                            {**parent["tags"], "cpt.pipeline_key": parent["key"]},
                                            op["start_time"], parent["params"])
            else:
                sink.client.update_run(parent_id, status="RUNNING")
        tags = dict(op["tags"])
        run_name = op["run_name"]
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        elif tags.get("cpt.pipeline_label"):  # a pipeline's own parent (a Prefect flow): named uniquely too
            run_name = sink.unique_name(tags["cpt.pipeline_label"])
        self.run_id = sink.create_run(run_name, tags, op["start_time"], op["params"])
        self.parent_run_id = parent_id
        if self.stage in (self.cfg.get("system_metrics") or ()):
            self._monitor = mlflow_views.start_system_metrics(self.cfg, self.run_id)

    # -- spool (disk) --
    def _spool(self) -> Path:
        with self._lock:
            ops = list(self._ops)
        return spool.write(self.cfg, self.stage, ops, run_id=self.run_id, parent_run_id=self.parent_run_id,
                           failures=self._failures[-5:])


# ----------------------------------------------------------------------------------------------------------------
# spool replay (here, not in cpt.ops.spool: it drives a tracker's queue, and the tracker replays before it starts)


def replay(cfg: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Send every spooled run to the tracking store; a replayed file is deleted. Returns (file, ok, message)."""
    folder = Path(cfg["spool_dir"])
    files = spool.pending(folder)
    if not files:
        return []
    import fcntl

    results = []
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return [(str(folder), False, "another process is replaying")]
        for path in files:
            header, ops = spool.read(path)
            # the store configured now (a moved server keeps its runs); the experiment the run was meant for
            rcfg = {**cfg, "experiment": header.get("experiment") or cfg["experiment"], "close_timeout": 0.0}
            tr = MlflowTracker.__new__(MlflowTracker)
            Tracker.__init__(tr)
            tr.cfg, tr.stage, tr.model_name = rcfg, header.get("stage"), rcfg["model_name"]
            tr.run_id, tr.parent_run_id = header.get("run_id"), header.get("parent_run_id")
            tr._sink, tr._lock, tr._io = Sink(rcfg), threading.Lock(), threading.RLock()
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
                spool.rewrite(path, {**header, "run_id": tr.run_id, "parent_run_id": tr.parent_run_id}, tr._ops)
                results.append((str(path), False, (tr._failures or ["unknown"])[-1]))
                break  # the store is down: the rest would fail the same way
    return results
