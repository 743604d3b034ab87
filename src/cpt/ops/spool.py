"""The spool: tracking operations a down store missed, on disk. One JSONL file per run: a header
``{spool, uri, experiment, run_id, parent_run_id, stage, failures, spooled_at}``, then one operation per line, with
copies of the artifacts beside it (``<name>.files/``: the file may change before the replay, and the run must get
what the stage produced). ``cpt.ops.mlflow_tracker.replay`` sends them."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from cpt.io import atomic_open
from cpt.ops.run_meta import now_ms


def write(cfg: dict[str, Any], stage: str | None, ops: list[dict[str, Any]], *, run_id: str | None,
          parent_run_id: str | None, failures: list[str]) -> Path:
    folder = Path(cfg["spool_dir"])
    name = f"{time.strftime('%Y%m%dT%H%M%S')}-{stage or 'run'}-{uuid.uuid4().hex[:8]}"
    files = folder / f"{name}.files"
    out_ops = []
    for n, op in enumerate(ops):
        if op["op"] == "artifact" and Path(op["path"]).exists():
            dest = files / str(n) / Path(op["path"]).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if Path(op["path"]).is_dir():
                shutil.copytree(op["path"], dest)
            else:
                shutil.copy2(op["path"], dest)
            op = {**op, "path": str(dest)}
        out_ops.append(op)
    header = {"spool": 1, "uri": cfg["uri"], "experiment": cfg["experiment"], "run_id": run_id,
              "parent_run_id": parent_run_id, "stage": stage, "failures": failures, "spooled_at": now_ms()}
    path = folder / f"{name}.jsonl"
    rewrite(path, header, out_ops)
    return path


def rewrite(path: Path, header: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """Atomically (re)write one spool file: a replay that stopped halfway keeps what is left, in order."""
    with atomic_open(path) as fh:
        for row in (header, *ops):
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def pending(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def read(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return lines[0], lines[1:]
