"""Learning-rate schedules for continual pretraining.

Continual pretraining re-warms and re-decays the LR (Ibrahim et al. 2024, arXiv 2403.08763): a linear warmup from 0
over ``warmup_steps``, then either cosine decay to ``min_lr`` (the default) or WSD (warmup-stable-decay: hold the
peak, then decay linearly to ``min_lr`` over the last ``decay_steps``). Pure functions of the step, so a resumed
run recomputes exactly the same LR as the uninterrupted one (nothing to checkpoint).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(
    step: int,
    *,
    max_lr: float,
    min_lr: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    decay_steps: int | None = None,
) -> float:
    """LR for optimizer step ``step`` (0-based). ``decay_steps`` is WSD's final linear-decay length."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {SCHEDULES}")
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return max_lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay = decay_steps if decay_steps is not None else max(1, (total_steps - warmup_steps) // 5)
    decay_start = total_steps - decay
    if step < decay_start:
        return max_lr
    progress = min(1.0, (step - decay_start) / max(1, decay))
    return max_lr + (min_lr - max_lr) * progress


def lr_for(step: int, cfg: dict) -> float:
    """LR at optimizer step ``step``; the embeddings-only phase is a run of its own with its own warmup/decay."""
    phase0 = int(cfg["embed_only_steps"])
    if step < phase0:
        s, total = step, phase0
    else:
        s, total = step - phase0, cfg["steps"] - phase0
    return lr_at(s, max_lr=float(cfg["lr"]), min_lr=float(cfg["min_lr"]), total_steps=total,
                 warmup_steps=int(round(float(cfg["warmup"]) * total)), schedule=cfg["schedule"],
                 decay_steps=max(1, int(round(float(cfg["decay_fraction"]) * total))))
