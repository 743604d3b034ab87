"""DVC commands for the flows, serialized per repository.

Every Prefect task runs its stage as ``dvc repro --single-item <stage>``, so the flow and a user's ``dvc repro`` can
never disagree about what is up to date: DVC decides (and skips a stage whose deps, params and code are unchanged).
Two DVC commands in one repo at once fail on ``.dvc/tmp/rwlock``; a file lock next to it makes concurrent flows (or a
task retry overlapping a straggler) wait their turn instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from filelock import FileLock


class DvcFailed(RuntimeError):
    """A DVC command exited non-zero; the message ends with the tail of its output (the stage's error line)."""


@dataclass
class DvcResult:
    args: list[str]
    returncode: int
    seconds: float
    output: list[str] = field(default_factory=list)

    def skipped(self, stage: str) -> bool:
        """DVC found the stage up to date (or restored it from the run cache) and did not run its command."""
        markers = (f"Stage '{stage}' didn't change, skipping", f"Stage '{stage}' is cached - skipping run")
        return any(m in line for line in self.output for m in markers)


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC and the stage commands it runs: this interpreter's bin dir first on PATH (so the
    ``cpt`` in dvc.yaml's ``cmd`` is the one installed next to the flow), analytics off."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.update(extra or {})
    return env


def repo_lock(root: str | Path) -> FileLock:
    path = Path(root) / ".dvc" / "tmp" / "cpt-flows.lock"  # .dvc/tmp is git-ignored by DVC itself
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def run_dvc(args: Sequence[str], root: str | Path, *, env: dict[str, str] | None = None,
            logger: logging.Logger | logging.LoggerAdapter | None = None, check: bool = True) -> DvcResult:
    """Run ``dvc <args>`` in ``root`` under the repo lock, streaming its output lines to ``logger``."""
    logger = logger or logging.getLogger("cpt.flows")
    cmd = [sys.executable, "-m", "dvc", *args]
    tail: deque[str] = deque(maxlen=40)
    lines: list[str] = []
    with repo_lock(root):
        started = time.perf_counter()
        logger.info("$ dvc %s", " ".join(args))
        proc = subprocess.Popen(cmd, cwd=root, env=dvc_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, encoding="utf-8", errors="replace", bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.strip():
                logger.info("%s", line)
                tail.append(line)
                if line.startswith(("Stage '", "Running stage")):
                    lines.append(line)
        rc = proc.wait()
        seconds = time.perf_counter() - started
    result = DvcResult(list(args), rc, round(seconds, 3), lines)
    if check and rc != 0:
        raise DvcFailed(f"dvc {' '.join(args)} exited {rc} in {root}:\n" + "\n".join(tail))
    return result
