"""Resume decisions: the fingerprint of every param that shapes a run (stored in each checkpoint), and which
changes ``train.resume: force`` may continue through (schedule and optimizer knobs) versus those that would mix two
runs (data, batch, init, seed, model)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from cpt.errors import ConfigError

log = logging.getLogger("cpt.stages.train")


# Keys that ``resume: force`` may change between a checkpoint and its continuation (a warning says the run is no longer
# the uninterrupted one). Any other change (batch, data mix, init, seed, model) makes continuing meaningless.
RESUME_SAFE = {"steps", "lr", "min_lr", "warmup", "schedule", "decay_fraction", "embed_lr_mult", "embed_only_steps",
               "weight_decay", "betas", "grad_clip"}


# Keys that never affect the trajectory. micro_batch and grad_accum are not in the fingerprint, the global batch is:
# a run continues on another number of ranks with the grad_accum that keeps it (distributed.batch_for_world).
NOT_TRAJECTORY = {"micro_batch", "grad_accum", "async_checkpoint",
                  "eval_interval", "eval_blocks", "ckpt_interval", "keep_checkpoints", "resume", "parallel", "device",
                  "compile", "activation_checkpointing", "loss_chunk", "peak_tflops", "log_interval",
                  "trust_remote_code", "dtype", "threads"}


def fingerprint_items(cfg: dict, seed: int, shards_meta: dict, base_config: dict,
                      world_size: int = 1) -> dict[str, Any]:
    items = {k: v for k, v in cfg.items() if k not in NOT_TRAJECTORY}
    items["global_batch"] = int(cfg["micro_batch"]) * int(cfg["grad_accum"]) * world_size
    items["seed"] = seed
    items["shards"] = hashlib.sha256(json.dumps(shards_meta, sort_keys=True).encode()).hexdigest()[:16]
    items["base"] = hashlib.sha256(json.dumps(base_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return items


def changed_items(saved: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def describe_changes(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())


def check_forceable(path: Path, changed: dict[str, tuple[Any, Any]]) -> None:
    unsafe = {k: v for k, v in changed.items() if k not in RESUME_SAFE}
    if unsafe:
        raise ConfigError(f"{path}: train.resume=force cannot continue a checkpoint made with other "
                          f"{describe_changes(unsafe)}: that would mix two runs. Use train.resume=true to start over")
    log.warning("train.resume=force: continuing %s with changed params (%s); the result is not an uninterrupted "
                "run's", path, describe_changes(changed))
