"""Packing conversations into fixed rows whose attention never crosses from one conversation into another.

Why pack: instruction examples range from ~20 to ~1,000 tokens; padding every one to the longest wastes most of the
compute, and sorting by length to save padding correlates the batches with length. Packing fills each row with
whole conversations (best-fit decreasing: ~95%+ of positions are real tokens) and keeps every row the same shape.

Why it is exact: each conversation in a row gets position ids that restart at 0, and no attention mask is passed.
transformers then derives the block-diagonal causal mask from the position-id resets itself
(``masking_utils.find_packed_sequence_indices``: SDPA / eager / flex get a 4D block mask, flash-attention-2 gets
varlen ``cu_seqlens``), and RoPE sees each conversation from position 0. So a conversation's logits in a packed row
equal its logits alone (tests/test_sft.py checks that, and that they differ without the resets). Each conversation
contributes its own (input, target) pairs, ``ids[:-1] -> labels[1:]``: no target ever crosses a boundary.
Padding at the end of a row is its own segment (positions from 0), with IGNORE targets.

Rows are ``int64 (n_rows, 3, length)``: inputs, targets, position ids. ``PackedSplit`` exposes ``n_blocks`` and
``rows(index)``, the interface of ``cpt.training.data.ShardSplit``, so train's ``ReplaySampler`` (Bresenham replay,
seeded permutation per epoch, the data position as one integer: exact resume) draws SFT rows unchanged.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from cpt.sft.template import IGNORE, Encoded


@dataclass
class PackedSplit:
    name: str
    data: np.ndarray  # (n_rows, 3, length) int64
    examples: int  # conversations packed
    target_tokens: int  # assistant tokens (trained / scored)
    target_bytes: int  # UTF-8 bytes behind them (for bits per byte)
    fill: float  # share of positions holding a real token
    row_bytes: np.ndarray  # target bytes per row (a subset of rows is scored under several ranks)
    # one row per conversation, in row order: (row, first position, end position, assistant bytes); the unit the
    # gate's bootstrap resamples (cpt.sft.intervals): a conversation's NLL is the sum of its positions' losses
    spans: np.ndarray | None = None

    @property
    def n_blocks(self) -> int:
        return int(self.data.shape[0])

    def rows(self, index) -> torch.Tensor:
        return torch.from_numpy(self.data[np.asarray(index, dtype=np.int64)])


def plan(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: example indices per row; each row's lengths sum to <= capacity. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row), sorted
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"example of {need} positions does not fit a row of {capacity}")
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            remaining, row = free.pop(k)
        else:
            remaining, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if remaining - need > 0:
            bisect.insort(free, (remaining - need, row))
    for r in rows:
        r.sort()  # input order inside a row (the order does not change any logit)
    return rows


def pack(name: str, examples: list[Encoded], length: int, pad_id: int) -> PackedSplit:
    """Rows of ``length`` positions; an example of n ids takes n - 1 positions (inputs ids[:-1])."""
    need = [len(e.ids) - 1 for e in examples]
    layout = plan(need, length)
    data = np.empty((len(layout), 3, length), dtype=np.int64)
    data[:, 0] = pad_id
    data[:, 1] = IGNORE
    used = 0
    row_bytes = np.zeros(len(layout), dtype=np.int64)
    spans = []
    for r, members in enumerate(layout):
        at = 0
        for i in members:
            e, n = examples[i], need[i]
            row_bytes[r] += e.assistant_bytes
            spans.append((r, at, at + n, e.assistant_bytes))
            data[r, 0, at : at + n] = e.ids[:-1]
            data[r, 1, at : at + n] = e.labels[1:]
            data[r, 2, at : at + n] = np.arange(n)
            at += n
        data[r, 2, at:] = np.arange(length - at)  # padding: a segment of its own
        used += at
    targets = sum(sum(1 for t in e.labels[1:] if t != IGNORE) for e in examples)
    return PackedSplit(name, data, len(examples), targets, int(row_bytes.sum()),
                       used / max(1, data.shape[0] * length), row_bytes,
                       np.asarray(spans, dtype=np.int64).reshape(-1, 4))


def to_device(rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, position_ids) for ``CausalLMLoss``."""
    rows = rows.to(device, non_blocking=True)
    return rows[:, 0].contiguous(), rows[:, 1].contiguous(), rows[:, 2].contiguous()
