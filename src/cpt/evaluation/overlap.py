"""The role barrier, checked on what training actually saw.

``role: eval`` documents (and the held-out documents split off by the shards stage) must never be trained on. The
clean stage decontaminates at the n-gram level; this check is the last line: it splits the training shards the train
stage reads back into documents at EOS and looks each one up among the evaluation documents. A whole evaluation
document inside the training stream means the barrier broke somewhere upstream (a role lost, a source routed to the
wrong split, decontamination bypassed), which makes every number in the report meaningless, so the stage stops.

Matching is on token ids, not decoded text: each evaluation document is encoded with the shards' own tokenizer
(exactly as the shards stage encodes a document) and the hash of its id sequence is looked up among the hashes of the
shard segments (special tokens stripped). That is exact for the same text and needs no decoding of the training
stream (decoding 10M tokens costs ~20 s on 2 cores; hashing the segments well under a second). The clean
``role: train`` records are checked on text (NFC, whitespace-normalised), which also catches near-verbatim copies.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from cpt.errors import DataError
from cpt.io import read_json

log = logging.getLogger("cpt.eval")


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_hash(text: str) -> str:
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).hexdigest()


def ids_hash(ids: Iterable[int] | np.ndarray) -> str:
    arr = np.asarray(ids, dtype="<u4")
    return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()


@dataclass
class OverlapIndex:
    """Hashes of the evaluation documents (text and, with a tokenizer, token ids), each mapped to its source."""

    by_text: dict[str, str] = field(default_factory=dict)
    by_ids: dict[str, str] = field(default_factory=dict)
    prefixes: set[str] = field(default_factory=set)  # first PREFIX normalised characters of each document

    PREFIX = 32

    @classmethod
    def _prefix(cls, text: str) -> str:
        # normalise() of a short head, so a 1 MB training book is never normalised whole just to be rejected
        head = normalise(text[: 8 * cls.PREFIX])
        if len(head) < cls.PREFIX and len(text) > 8 * cls.PREFIX:
            head = normalise(text)
        return head[: cls.PREFIX]

    def add(self, source: str, texts: Iterable[str], encode=None) -> None:
        """``encode(list[str]) -> list[list[int]]``: the shards tokenizer, no special tokens."""
        texts = [t for t in texts if normalise(t)]
        for t in texts:
            self.by_text.setdefault(text_hash(t), source)
            self.prefixes.add(self._prefix(t))
        if encode is not None and texts:
            variants = texts + [t.strip() for t in texts if t.strip() != t]
            for ids in encode(variants):
                if len(ids):
                    self.by_ids.setdefault(ids_hash(ids), source)

    @staticmethod
    def _count(keys: Iterable[tuple[str, str]], table: dict[str, str]) -> tuple[int, dict[str, int], list[str]]:
        checked, leaks, examples = 0, {}, []
        for key, shown in keys:
            checked += 1
            src = table.get(key)
            if src is not None:
                leaks[src] = leaks.get(src, 0) + 1
                if len(examples) < 5:
                    examples.append(f"{src}: {shown}")
        return checked, leaks, examples

    def find_texts(self, train_texts: Iterable[str]) -> tuple[int, dict[str, int], list[str]]:
        """(documents checked, {source: leaked documents}, a few leaked snippets) for training texts."""
        def keys():
            for t in train_texts:
                if self._prefix(t) in self.prefixes:  # cheap pre-filter; the full hash decides
                    yield text_hash(t), repr(normalise(t)[:80])
                else:
                    yield "", ""

        return self._count(keys(), self.by_text)

    def find_segments(self, segments: Iterable[np.ndarray]) -> tuple[int, dict[str, int], list[str]]:
        """The same for token-id segments of a training stream."""
        return self._count(((ids_hash(s), f"{len(s)} tokens") for s in segments), self.by_ids)


def shard_streams(shards_dir: Path) -> tuple[dict, list[Path]]:
    """meta.json and the training streams (``*/train.bin``) listed in it."""
    meta_path = Path(shards_dir) / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{meta_path}: not found; run `cpt shards` first (or set eval.overlap.shards: null)")
    meta = read_json(meta_path)
    for key in ("dtype", "eos_id"):
        if key not in meta:
            raise DataError(f"{meta_path}: missing {key!r}")
    splits = meta.get("splits") or {}
    names = sorted(s for s in splits if s.endswith("/train")) or ["new/train", "old/train"]
    paths = [Path(shards_dir) / f"{name}.bin" for name in names]
    return meta, [p for p in paths if p.exists()]


def shard_segments(path: Path, dtype: str, eos_id: int, special_ids: Iterable[int] = (),
                   max_tokens: int | None = None) -> Iterator[np.ndarray]:
    """Documents of one flat token stream: split at EOS, other special tokens (BOS) removed. A document cut by the
    dropped tail block comes out truncated and simply matches nothing."""
    ids = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    ids = np.asarray(ids)
    drop = np.array(sorted(set(int(i) for i in special_ids) - {int(eos_id)}), dtype=ids.dtype)
    for seg in np.split(ids, np.flatnonzero(ids == eos_id) + 1):
        seg = seg[:-1] if len(seg) and seg[-1] == eos_id else seg
        if len(drop):
            seg = seg[~np.isin(seg, drop)]
        if len(seg):
            yield seg
