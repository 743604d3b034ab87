"""One optimizer step: forward + backward over the micro-batches, finite check, clip, AdamW.

Shared by the ``train`` stage and bench/bench_train_gpu.py, so the benchmark measures exactly the step the stage runs.
The loss is the mean over every target token of the GLOBAL batch: each rank back-propagates its token-loss sum
divided by its own token count, and DDP / FSDP average over ranks, so 1 process x 4 sequences and 2 processes x 2
sequences give the same gradient (all blocks have the same length, so there is no padding to weigh).
Targets equal to ``IGNORE_INDEX`` (sft's prompt tokens and padding) are not counted: the mean is over trained tokens,
and since ranks then hold different counts, each rank divides by the global count / world size (all-reduced first),
so the averaged gradient is still the global per-token mean (for pretraining that is each rank's own count: the
same division as before, bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cpt.device import autocast
from cpt.training import distributed, optim
from cpt.training.loss import IGNORE_INDEX


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class StepResult:
    loss_sum: float  # summed token loss over the global batch (all ranks)
    tokens: int  # target tokens in the global batch
    grad_norm: float
    token_losses: list[torch.Tensor]  # this rank's per-token losses, one (B, T) tensor per micro-batch (detached)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.tokens)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, ...]],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    grad_clip: float,
    clip_params: list[nn.Parameter],
    embed_only: bool = False,
) -> StepResult:
    """``micro_batches``: this rank's (inputs, targets[, position_ids]) tuples, int64 (B, T), already on ``device``
    (the tuple is the model's positional arguments)."""
    local_tokens = int(sum((b[1] != IGNORE_INDEX).sum() for b in micro_batches))
    counts = distributed.all_reduce_sum(torch.tensor(float(local_tokens), dtype=torch.float64, device=device))
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    per_rank = max(1.0, float(counts) / world)
    total = torch.zeros((), dtype=torch.float64, device=device)
    token_losses = []
    for i, batch in enumerate(micro_batches):
        with distributed.no_sync(model, last_micro=i == len(micro_batches) - 1):
            with autocast(device, amp_dtype):
                loss_sum, losses = model(*batch)
            (loss_sum / per_rank).backward()
        total += loss_sum.detach().double()
        token_losses.append(losses.detach())
    stats = torch.stack([total, torch.tensor(float(local_tokens), dtype=torch.float64, device=device)])
    distributed.all_reduce_sum(stats)
    loss_sum, tokens = float(stats[0]), int(stats[1])
    if not math.isfinite(loss_sum):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss is {loss_sum / max(1, tokens)}")
    if embed_only:
        optim.drop_body_grads(optimizer)
    grad_norm = optim.clip_grad_norm(clip_params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, tokens, grad_norm, token_losses)


@torch.no_grad()
def evaluate(model: nn.Module, batches, *, device: torch.device, amp_dtype: torch.dtype | None) -> tuple[float, int]:
    """(summed token loss, tokens) over ``batches`` of (inputs, targets[, position_ids]), summed over ranks."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        with autocast(device, amp_dtype):
            loss_sum, _ = model(*batch)
        total += loss_sum.double()
        tokens += (batch[1] != IGNORE_INDEX).sum()
    stats = torch.stack([total, tokens])
    distributed.all_reduce_sum(stats)
    return float(stats[0]), int(stats[1])
