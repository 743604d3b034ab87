"""Task functions for the engine tests. They live in an importable module (not in a test file) because local
workers are spawned processes and Ray workers unpickle tasks: both look functions up by module name."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from cpt.data.cleanwork import finish_shard


def square(x: int) -> int:
    return x * x


STARTED: list[int] = []  # in-process runs (workers: 1) record the order tasks start in


def record_start(x: int) -> int:
    STARTED.append(x)
    return x


def kill_self(x: int) -> int:
    """A worker killed mid-task (as the OOM killer or a lost node would)."""
    if x == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def finish_or_die(t: dict[str, Any]) -> dict[str, Any]:
    """``finish_shard``, except that the second shard's worker is SIGKILLed the first time it gets there
    (a marker file next to the work folder remembers that it died once)."""
    marker = Path(t["work"]).with_name("killed-once")
    if t["key"].endswith("/00001") and not marker.exists():
        marker.write_text("x")
        os.kill(os.getpid(), signal.SIGKILL)
    return finish_shard(t)
