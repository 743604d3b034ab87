"""Measurements during training: batches of val blocks, mean losses, bits per byte from a split's bytes per token,
per-domain train losses (all-reduced), and the blocks used to probe and calibrate the resize."""

from __future__ import annotations

import math

import numpy as np
import torch

from cpt.device import autocast
from cpt.training import distributed
from cpt.training.data import ShardSplit, eval_rows

LN2 = math.log(2.0)


def to_xy(blocks: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = blocks.to(device, non_blocking=True)
    return blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


def eval_batches(split: ShardSplit, rows: np.ndarray, micro_batch: int, device: torch.device):
    for i in range(0, len(rows), micro_batch):
        yield to_xy(split.rows(rows[i : i + micro_batch]), device)


def bpb(loss_nats: float, split: ShardSplit | None) -> float:
    """Bits per byte from the mean token loss and the split's bytes per token."""
    if split is None or not math.isfinite(split.bytes_per_token):
        return float("nan")
    return loss_nats / split.bytes_per_token / LN2


def resize_probe_rows(split: ShardSplit | None, max_blocks: int, rows_before: int) -> np.ndarray:
    """Old-domain val blocks the BASE model can read (every id < its embedding rows): the before/after-resize
    comparison needs the same blocks on both sides."""
    if split is None:
        return np.zeros(0, dtype=np.int64)
    rows = eval_rows(split, max_blocks)
    return np.array([i for i in rows if int(split.blocks[i].max()) < rows_before], dtype=np.int64)


def calibration_blocks(split: ShardSplit | None) -> torch.Tensor:
    """A few old-domain TRAIN blocks (spread over the split, ~2k tokens) for calibrate_new_logits; inputs only."""
    if split is None or split.n_blocks == 0:
        return torch.zeros((0, 1), dtype=torch.long)
    n = min(split.n_blocks, max(1, 2048 // split.blocks.shape[1]))
    return split.rows(np.linspace(0, split.n_blocks - 1, n).round().astype(np.int64))[:, :-1]


def mean_loss(core, split, rows, micro_batch, device, amp_dtype) -> float:
    if split is None or len(rows) == 0:
        return float("nan")
    core.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(split, rows, micro_batch, device):
            with autocast(device, amp_dtype):
                s, _ = core(x, y)
            total += float(s)
            n += y.numel()
    core.train()
    return total / n


def domain_losses(token_losses: list[torch.Tensor], is_old: list[torch.Tensor], device) -> dict[str, float]:
    """Mean train loss per domain over the global batch (sums and counts all-reduced)."""
    stats = torch.zeros(4, dtype=torch.float64, device=device)
    for losses, old in zip(token_losses, is_old):
        per_row = losses.double().sum(dim=1)
        old = old.to(device)
        stats[0] += per_row[~old].sum()
        stats[1] += (~old).sum() * losses.shape[1]
        stats[2] += per_row[old].sum()
        stats[3] += old.sum() * losses.shape[1]
    distributed.all_reduce_sum(stats)
    s = stats.tolist()
    return {"new": s[0] / s[1] if s[1] else float("nan"), "old": s[2] / s[3] if s[3] else float("nan")}
