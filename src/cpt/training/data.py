"""Training data: memory-mapped token shards, replay mixing, and a data position that is one integer.

The shards stage writes flat token-id files (``data/shards/{new,old}/{train,val}.bin``) cut into blocks of
``block_size`` tokens. Training reads them with ``np.memmap`` (nothing is loaded up front, so a corpus larger than
RAM works) and turns each block into one sequence: inputs ``block[:-1]``, targets ``block[1:]``.

Why the sampler is a pure function of a global sample index: exact resume. Sample ``i`` of the run (counting across
steps, micro-batches and ranks) is always the same block, so the whole data position is ``samples`` (how many
sequences the run has consumed) and a resumed run, or a run on another number of GPUs with the same global batch,
reads exactly the same sequences in the same order. No iterator state, no worker state to checkpoint.

Replay (``replay_ratio`` = fraction of old-domain tokens): every block holds the same number of tokens, so a token
fraction is a block fraction. Sample ``i`` is old-domain iff ``floor((i+1)·r) > floor(i·r)`` (a Bresenham line), so
any window of ``n`` consecutive samples holds ``floor(n·r)`` or ``ceil(n·r)`` old blocks: the ratio holds per step,
not just on average. Within a domain, blocks come in a fresh seeded permutation each epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from cpt.errors import DataError
from cpt.io import read_json

DOMAINS = ("new", "old")


@dataclass
class ShardSplit:
    """One ``<domain>/<split>.bin`` file as ``blocks`` rows of ``block_size`` tokens (memory-mapped)."""

    name: str  # "new/train"
    path: Path
    blocks: np.ndarray  # (n_blocks, block_size) memmap view
    tokens: int  # tokens behind the split (meta), for bits per byte
    bytes: int  # UTF-8 bytes behind those tokens (meta)
    # per block [language index into ``langs`` or -1 (mixed), UTF-8 bytes behind its targets] from the shards
    # stage's <split>.blocks.npy (cpt.data.block_bytes); None for shards written before it existed
    block_info: np.ndarray | None = None
    langs: tuple[str, ...] = ()

    @property
    def n_blocks(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def bytes_per_token(self) -> float:
        """Bytes of text per token: ``bpb = loss_nats / bytes_per_token / ln 2``. NaN if the split has no bytes."""
        return self.bytes / self.tokens if self.tokens and self.bytes else float("nan")

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """Blocks ``index`` as an int64 tensor (fancy indexing copies them out of the memmap)."""
        return torch.from_numpy(self.blocks[np.asarray(index, dtype=np.int64)].astype(np.int64))


@dataclass
class Shards:
    folder: Path
    meta: dict
    splits: dict[str, ShardSplit]

    @property
    def block_size(self) -> int:
        return int(self.meta["block_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def split(self, name: str) -> ShardSplit | None:
        return self.splits.get(name)


def open_shards(folder: Path) -> Shards:
    """Open ``meta.json`` and memory-map every ``<domain>/<split>.bin`` it lists (checked against the meta)."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{meta_path}: not found; run `cpt shards` first")
    meta = read_json(meta_path)
    for key in ("dtype", "block_size", "vocab_size", "splits"):
        if key not in meta:
            raise DataError(f"{meta_path}: missing key {key!r}")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    if dtype.kind != "u" or dtype.itemsize not in (2, 4):
        raise DataError(f"{meta_path}: dtype {meta['dtype']!r} is not uint16/uint32")
    block = int(meta["block_size"])
    if block < 2:
        raise DataError(f"{meta_path}: block_size {block} < 2 (a block needs an input and a target)")
    splits: dict[str, ShardSplit] = {}
    for name, info in meta["splits"].items():
        path = folder / f"{name}.bin"
        if not path.exists():
            raise DataError(f"{path}: listed in {meta_path} but missing")
        n_items = path.stat().st_size // dtype.itemsize
        if path.stat().st_size % dtype.itemsize or n_items % block:
            raise DataError(f"{path}: {path.stat().st_size} bytes is not a whole number of {block}-token blocks")
        if n_items == 0:
            arr = np.zeros((0, block), dtype=dtype)
        else:
            arr = np.memmap(path, dtype=dtype, mode="r").reshape(-1, block)
        if "blocks" in info and int(info["blocks"]) != arr.shape[0]:
            raise DataError(f"{path}: {arr.shape[0]} blocks on disk, meta.json says {info['blocks']}")
        block_info, info_path = None, folder / f"{name}.blocks.npy"
        if info_path.exists():
            block_info = np.load(info_path)
            if block_info.shape != (arr.shape[0], 2):
                raise DataError(f"{info_path}: shape {block_info.shape}, expected ({arr.shape[0]}, 2): rerun `cpt shards`")
        splits[name] = ShardSplit(name, path, arr, int(info.get("tokens", arr.size)), int(info.get("bytes", 0)),
                                  block_info, tuple(info.get("lang_index") or ()))
    return Shards(folder, meta, splits)


class ReplaySampler:
    """Global sample index -> (domain, block) for training: Bresenham replay mix, seeded permutation per epoch."""

    def __init__(self, new: ShardSplit | None, old: ShardSplit | None, replay_ratio: float, seed: int):
        if not 0.0 <= replay_ratio <= 1.0:
            raise ValueError(f"replay_ratio {replay_ratio} outside [0, 1]")
        # Exact rational arithmetic: floor(i * 0.3) must not depend on float rounding at i = 10**9.
        self.ratio = Fraction(replay_ratio).limit_denominator(1_000_000)
        self.seed = int(seed)
        self.domains = {"new": new, "old": old}
        for name, split in self.domains.items():
            share = self.ratio if name == "old" else 1 - self.ratio
            if share > 0 and (split is None or split.n_blocks == 0):
                raise DataError(
                    f"{name}/train has no blocks but train.replay_ratio={replay_ratio} needs {name}-domain data"
                )
        self._perms: dict[tuple[str, int], np.ndarray] = {}

    def old_before(self, i: int) -> int:
        """How many of samples ``0..i-1`` are old-domain."""
        return math.floor(i * self.ratio)

    def locate(self, i: int) -> tuple[str, int]:
        old_i = self.old_before(i)
        if self.old_before(i + 1) > old_i:
            return "old", self._block("old", old_i)
        return "new", self._block("new", i - old_i)

    def _block(self, domain: str, k: int) -> int:
        n = self.domains[domain].n_blocks  # type: ignore[union-attr]
        epoch, pos = divmod(k, n)
        key = (domain, epoch)
        perm = self._perms.get(key)
        if perm is None:
            rng = np.random.default_rng([self.seed, DOMAINS.index(domain), epoch])
            perm = rng.permutation(n)
            # Keep only the current epochs; a long run must not grow this cache.
            self._perms = {k2: v for k2, v in self._perms.items() if k2[0] != domain or k2[1] >= epoch - 1}
            self._perms[key] = perm
        return int(perm[pos])

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. start+count-1``: (blocks int64 (count, block_size), is_old bool (count,))."""
        located = [self.locate(i) for i in range(start, start + count)]
        rows = []
        for domain in DOMAINS:
            idx = [b for d, b in located if d == domain]
            if idx:
                rows.append((domain, self.domains[domain].rows(np.array(idx))))  # type: ignore[union-attr]
        by_domain = {d: iter(t) for d, t in rows}
        blocks = torch.stack([next(by_domain[d]) for d, _ in located])
        is_old = torch.tensor([d == "old" for d, _ in located], dtype=torch.bool)
        return blocks, is_old

    def epochs(self, samples: int) -> dict[str, float]:
        """Epochs of each domain's train split consumed after ``samples`` samples (for the log)."""
        old = self.old_before(samples)
        out = {}
        for domain, count in (("new", samples - old), ("old", old)):
            split = self.domains[domain]
            out[domain] = count / split.n_blocks if split is not None and split.n_blocks else 0.0
        return out


def eval_rows(split: ShardSplit | None, max_blocks: int, world_size: int = 1) -> np.ndarray:
    """The val blocks to score: the first ``max_blocks`` (0 = all), cut to a multiple of ``world_size`` so every
    rank runs the same number of forwards (FSDP needs all ranks in every forward)."""
    if split is None:
        return np.zeros(0, dtype=np.int64)
    n = split.n_blocks if max_blocks <= 0 else min(split.n_blocks, max_blocks)
    n -= n % world_size
    return np.arange(n, dtype=np.int64)
