"""Stage ``train``: continual pretraining of the base model on the new language, with replay of the old one.

Reads data/base (HF model), data/tokenizer (extended tokenizer + new_tokens.json) and data/shards (token blocks);
writes data/models/cpt (HF folder + the extended tokenizer), data/checkpoints/ (resumable), metrics/train_curve.csv.
The loop itself is ``cpt.training.trainer`` (read it top to bottom, as nanoGPT's train.py); each concern lives in
cpt/training/:

    data.py         memmap shards, replay mixing, the data position (one integer)
    embeddings.py   resize to the extended vocab (padded to 64) and initialise the new rows
    loss.py         lm_head + cross-entropy in chunks, no full logits tensor
    optim.py        AdamW groups (embeddings/lm_head LR multiplier), embeddings-only phase
    step.py         one optimizer step (also what bench/bench_train_gpu.py times)
    schedule.py     warmup + cosine / WSD, a pure function of the step
    checkpoint.py   sharded DCP checkpoints (optionally async), exact resume, resharding to another world size
    distributed.py  torchrun, DDP / FSDP2, the grad_accum that keeps the global batch on another world size
    sharded.py      meta-device build, per-rank slices of the base, new rows set after sharding
    plan.py         `cpt train --plan`: memory per GPU and step time before a run
    flops.py        MFU
    resume.py       the run's fingerprint, what ``resume: force`` may change
    measure.py      val losses, bits per byte, the resize probe
    curve.py        metrics/train_curve.csv and the per-step log
    export.py       the HF folder (safetensors shards + index) from the sharded state, also `cpt export`

Resume (``train.resume``), decided against a fingerprint of every param that shapes the run (seed, data, base, and
the train keys that change the trajectory), stored in each checkpoint:

- ``true`` (default): the newest complete checkpoint of THIS run (same fingerprint) is continued, and the losses at
  every later step equal the uninterrupted run's bit for bit on CPU (tests/test_train_resume.py kills one with
  SIGKILL). A run whose final checkpoint is there is NOT retrained: data/models/cpt is re-exported from it and the
  stored metrics are returned (``retrained: false``). Checkpoints of a run with other params (``dvc exp run -S
  train.lr=...``: data/checkpoints is kept across reruns) are removed with a warning naming the changed params, and
  training starts over.
- ``force``: continue the newest checkpoint even though schedule params changed (lr, steps, warmup, ...: "it
  diverged, continue with a lower LR", "train 1000 steps more"); other changes (data, batch, init, seed) refuse.
- ``false``: remove the checkpoints and start over.
"""

from __future__ import annotations

import logging
from typing import Any


from cpt.errors import ConfigError
from cpt.layout import Layout
from cpt.params import section, stage_config
from cpt.training import adapters, distributed
from cpt.training.loop_config import LOOP_DEFAULTS, check_loop
from cpt.training.trainer import TrainingDiverged, train

__all__ = ["DEFAULTS", "TrainingDiverged", "config", "run"]  # TrainingDiverged: the error the loop raises

log = logging.getLogger("cpt.stages.train")

DEFAULTS: dict[str, Any] = {
    "steps": 80,
    "micro_batch": 8,
    "grad_accum": 1,
    "lr": 2.0e-3,
    "min_lr": 2.0e-4,
    "warmup": 0.05,
    "schedule": "cosine",
    "decay_fraction": 0.2,
    "embed_lr_mult": 1.0,
    "embed_only_steps": 0,
    "weight_decay": 0.1,
    "betas": [0.9, 0.95],
    "grad_clip": 1.0,
    "replay_ratio": 0.25,
    "embed_init": "subtoken_mean",
    "new_token_mass": 0.01,
    "eval_interval": 20,
    "eval_blocks": 32,
    "async_checkpoint": False,
    "peak_tflops": None,
    "trust_remote_code": False,
    **LOOP_DEFAULTS,
    **adapters.DEFAULTS,
}


def config(params: dict) -> dict[str, Any]:
    cfg = stage_config(params, "train", DEFAULTS)
    check_loop("train", cfg)
    adapters.check_method("train", cfg)
    if not 0.0 <= float(cfg["replay_ratio"]) <= 1.0:
        raise ConfigError(f"params.yaml: train.replay_ratio={cfg['replay_ratio']} must be in [0, 1]")
    if not 0.0 <= float(cfg["warmup"]) < 1.0:
        raise ConfigError(f"params.yaml: train.warmup={cfg['warmup']} is a fraction of steps, in [0, 1)")
    if cfg["dtype"] in ("fp16", "float16"):
        # fp16 gradients underflow without a loss scaler (torch.amp.GradScaler), which this loop does not run: bf16
        # has fp32's range and needs none, and every GPU cpt targets (A100, H100) has it.
        raise ConfigError("params.yaml: train.dtype=fp16 is not supported (no GradScaler); use bf16 or fp32")
    if not 0 <= int(cfg["embed_only_steps"]) < cfg["steps"]:
        raise ConfigError(f"params.yaml: train.embed_only_steps={cfg['embed_only_steps']} must be in [0, steps)")
    return cfg


def run(params: dict, layout: Layout) -> dict:
    cfg = config(params)
    seed = int(params.get("seed", 0))
    with distributed.session(cfg["device"], cfg["threads"]) as (info, device):
        return train(cfg, seed, layout, info, device, given=set(section(params, "train")))
