"""Measurements during training: batches of val blocks, mean losses, exact bits per byte per language on val blocks
spread over the whole split (the shards' per-block bytes), per-domain train losses (all-reduced), and the blocks used
to probe and calibrate the resize."""

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


def lang_rows(split: ShardSplit | None, max_blocks: int, world_size: int = 1) -> dict[str, np.ndarray]:
    """Val blocks to score, per language: that language's single-language blocks, ``max_blocks`` of them (0 = all)
    spread evenly over the whole split (not its first blocks, which are all from the first source), cut to a multiple
    of ``world_size`` (every rank runs the same forwards). Shards without per-block bytes: one group ``"all"``."""
    if split is None or split.n_blocks == 0:
        return {}
    if split.block_info is None:
        return {"all": eval_rows(split, max_blocks, world_size)}
    out = {}
    for k, lang in enumerate(split.langs):
        idx = np.flatnonzero(split.block_info[:, 0] == k)
        if 0 < max_blocks < len(idx):
            idx = idx[np.unique(np.linspace(0, len(idx) - 1, max_blocks).round().astype(np.int64))]
        idx = idx[: len(idx) - len(idx) % world_size]
        if len(idx):
            out[lang] = idx
    return out


@torch.no_grad()
def split_bpb(model, split: ShardSplit, rows: np.ndarray, micro_batch: int, device, amp_dtype,
              specials: tuple[int, ...], rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """``{"loss_sum", "tokens", "nll", "bytes", "bpb"}`` on ``rows`` (this rank scores every world_size-th; sums
    all-reduced). ``loss_sum``/``tokens`` cover every target (the training loss); ``nll`` leaves out BOS/EOS targets,
    which have no bytes behind them (as eval scores no EOS), and ``bytes`` are the exact bytes behind the others
    (``block_info``), so ``bpb`` is what eval would measure on this text with this context. Shards without
    ``block_info`` fall back to the split's bytes per token."""
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, targets, text NLL, text targets
    skip = torch.tensor(sorted(set(specials)), dtype=torch.long, device=device)
    for x, y in eval_batches(split, rows[rank::world_size], micro_batch, device):
        with autocast(device, amp_dtype):
            total, losses = model(x, y)
        text = ~torch.isin(y, skip)
        stats[0] += total.double()
        stats[1] += y.numel()
        stats[2] += (losses.double() * text).sum()
        stats[3] += text.sum()
    distributed.all_reduce_sum(stats)
    loss_sum, tokens, nll, _ = stats.tolist()
    if split.block_info is not None:
        nbytes = float(split.block_info[rows, 1].sum())
        value = nll / (LN2 * nbytes) if nbytes else float("nan")
    else:
        nbytes, value = float("nan"), bpb(loss_sum / tokens, split) if tokens else float("nan")
    return {"loss_sum": loss_sum, "tokens": tokens, "nll": nll, "bytes": nbytes, "bpb": value}
