"""The checks every training loop's params share (``train`` and ``sft``): step counts, the LR schedule, resume.

One place, so a stage's params fail the same way whichever loop reads them: ``params.yaml: <stage>.<key>=...``."""

from __future__ import annotations

from typing import Any, Iterable

from cpt.errors import ConfigError
from cpt.training.schedule import SCHEDULES

# defaults every training loop shares (train and sft): checkpointing, resume, parallelism, numerics, logging
LOOP_DEFAULTS: dict[str, Any] = {
    "ckpt_interval": 20,
    "keep_checkpoints": 2,
    "resume": True,  # true | force | false
    "parallel": "ddp",
    "device": "auto",
    "dtype": "auto",
    "compile": False,
    "activation_checkpointing": False,
    "loss_chunk": 4096,
    "log_interval": 10,
    "threads": None,
}
LOOP_INTS = ("steps", "micro_batch", "grad_accum", "eval_interval", "ckpt_interval", "log_interval", "loss_chunk")
RESUME = (True, False, "force")


def check_loop(stage: str, cfg: dict[str, Any], ints: Iterable[str] = ()) -> None:
    """Raise a ``ConfigError`` naming ``<stage>.<key>`` for the first param out of its domain."""
    for key in (*LOOP_INTS, *ints):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ConfigError(f"params.yaml: {stage}.{key}={cfg[key]!r} must be an integer >= 1")
    if cfg["schedule"] not in SCHEDULES:
        raise ConfigError(f"params.yaml: {stage}.schedule={cfg['schedule']!r}: expected one of {SCHEDULES}")
    if float(cfg["min_lr"]) > float(cfg["lr"]):
        raise ConfigError(f"params.yaml: {stage}.min_lr={cfg['min_lr']} > {stage}.lr={cfg['lr']}")
    if cfg["resume"] not in RESUME:
        raise ConfigError(f"params.yaml: {stage}.resume={cfg['resume']!r}: expected true, false or force")
