"""Which pipeline execution a stage process belongs to, so that each `dvc repro` (or `dvc exp run`) gets its own
MLflow parent run instead of piling onto the last one with the same commit and params.

DVC starts every stage command as a child of the one ``dvc`` process that runs the pipeline (``DVC_STAGE`` is set
for it): that process, named by its pid and its start time (a pid is reused, a pid with its start time is not), is
the execution. Outside DVC the stage's own process is. A Prefect flow names its parent run itself
(``CPT_MLFLOW_RUN_ID``), so none of this is asked there. Linux reads ``/proc``; elsewhere psutil (MLflow's own
dependency) when installed; without either, executions are told apart by nothing (stages of one commit and params
then share a parent, as before).
"""

from __future__ import annotations

import os
from pathlib import Path


def _proc(pid: int) -> tuple[list[str], int, str] | None:
    """(argv, parent pid, start time) of a process, or None."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            return [a.decode(errors="replace") for a in argv if a], int(fields[1]), fields[19]
        except (OSError, IndexError, ValueError):
            return None
    try:
        import psutil

        p = psutil.Process(pid)
        return p.cmdline(), p.ppid(), f"{p.create_time():.3f}"
    except Exception:  # noqa: BLE001 - no psutil, no such process, no permission
        return None


def is_dvc(argv: list[str]) -> bool:
    """``dvc ...``, ``python .venv/bin/dvc ...`` or ``python -m dvc ...``."""
    names = [os.path.basename(a) for a in argv[:3]]
    return "dvc" in names or any(argv[i] == "-m" and argv[i + 1] == "dvc" for i in range(min(len(argv) - 1, 3)))


def execution_id() -> str:
    """``dvc:<pid>:<start>`` of the dvc process running this stage, else ``pid:<pid>:<start>`` of this process; ""
    when neither can be read."""
    if os.environ.get("DVC_STAGE"):
        pid = os.getppid()
        for _ in range(10):  # stage command <- shell <- dvc (<- the exp executor's dvc)
            info = _proc(pid)
            if info is None or pid <= 1:
                break
            if is_dvc(info[0]):
                return f"dvc:{pid}:{info[2]}"
            pid = info[1]
    own = _proc(os.getpid())
    return f"pid:{os.getpid()}:{own[2]}" if own else ""
