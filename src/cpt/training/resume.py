"""Resume decisions: the fingerprint of everything that shapes a run (stored in each checkpoint: the trajectory
params, the seed, content hashes of the base and the tokenizer, the shards' meta, the global batch), and which
changes ``train.resume: force`` may continue through (schedule and optimizer knobs) versus those that would mix two
runs (data, batch, init, seed, model)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from cpt.errors import ConfigError
from cpt.io import content_hash, shards_content
from cpt.training import checkpoint, distributed

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


def fingerprint_items(cfg: dict, seed: int, shards_meta: dict, base_dir: Path, tokenizer_dir: Path,
                      world_size: int, shards_dir: Path | None = None) -> dict[str, Any]:
    """Everything a checkpoint's trajectory depends on: the trajectory params, the seed, the CONTENT of the base
    (weights, config, its tokenizer; not cpt_base.json, which only describes it), of the extended tokenizer and of the
    shards (their meta, which carries a content hash of each domain's files since the shards stage writes one: other
    bytes with the same counts, e.g. re-cleaned or reordered documents, are other data), and the global batch."""
    items = {k: v for k, v in cfg.items() if k not in NOT_TRAJECTORY}
    items["seed"] = seed
    meta = dict(shards_meta)
    if "content" not in meta and shards_dir is not None:  # shards written before the meta carried it: hash now
        meta["content"] = shards_content(Path(shards_dir))
    items["shards"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    items["base"] = content_hash(base_dir, exclude=frozenset({"cpt_base.json"}))
    items["tokenizer"] = content_hash(tokenizer_dir)
    items["global_batch"] = int(world_size) * int(cfg["micro_batch"]) * int(cfg["grad_accum"])
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


def world_size_grad_accum(cfg: dict, fp: dict[str, Any], ckdir: Path, info: distributed.DistInfo) -> int:
    """train.grad_accum, or the one that keeps the global batch of the checkpoint being continued on another
    number of ranks (distributed.batch_for_world; refused when no whole grad_accum does). A checkpoint of another
    run (other params besides the batch) is left to ``resume_point``."""
    newest = checkpoint.latest(ckdir) if cfg["resume"] else None
    if newest is None:
        return cfg["grad_accum"]
    saved = checkpoint.read_state(newest)
    other = set(changed_items(saved.get("fingerprint", {}), fp)) - {"global_batch"}
    if other - (RESUME_SAFE if cfg["resume"] == "force" else set()):
        return cfg["grad_accum"]
    grad_accum, note = distributed.batch_for_world(saved, cfg["micro_batch"], cfg["grad_accum"], info.world_size)
    if note and info.main:
        log.warning("%s", note)
    return grad_accum
