"""The role barrier, checked on what training actually saw.

``role: eval`` documents (and the held-out documents split off by the shards stage) must never be trained on. The
clean stage decontaminates at the n-gram level; this check is the last line: it decodes the training shards the
train stage reads, splits them back into documents at EOS, and looks each one up, by a hash of its
whitespace-normalised NFC text, among the evaluation documents. A whole evaluation document inside the training
stream means the barrier broke somewhere upstream (a role lost, a source routed to the wrong split), which is the
failure that makes every number in the report meaningless, so the stage stops on it.

Tokenizers may normalise text, so each evaluation document is also hashed after an encode/decode round trip with
the shards' tokenizer: a leak is found whatever the tokenizer does to spacing or Unicode forms.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from cpt.errors import DataError
from cpt.io import read_json

log = logging.getLogger("cpt.eval")


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_hash(text: str) -> str:
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).hexdigest()


@dataclass
class OverlapIndex:
    """Hashes of the evaluation documents, each mapped to the source it came from."""

    by_hash: dict[str, str] = field(default_factory=dict)

    def add(self, source: str, texts: Iterable[str], roundtrip: Callable[[list[str]], list[str]] | None = None) -> None:
        texts = [t for t in texts if normalise(t)]
        for t in texts:
            self.by_hash.setdefault(text_hash(t), source)
        if roundtrip is not None:
            for t in roundtrip(texts):
                if normalise(t):
                    self.by_hash.setdefault(text_hash(t), source)

    def find(self, train_texts: Iterable[str]) -> tuple[int, dict[str, int], list[str]]:
        """(training documents checked, {source: leaked documents}, a few leaked snippets)."""
        checked, leaks, examples = 0, {}, []
        for text in train_texts:
            checked += 1
            src = self.by_hash.get(text_hash(text))
            if src is not None:
                leaks[src] = leaks.get(src, 0) + 1
                if len(examples) < 5:
                    examples.append(f"{src}: {normalise(text)[:80]!r}")
        return checked, leaks, examples


def shard_stream_paths(shards_dir: Path) -> tuple[dict, list[Path]]:
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


def shard_documents(
    path: Path, dtype: str, eos_id: int, decode: Callable[[list[list[int]]], list[str]],
    max_tokens: int | None = None, batch: int = 512,
) -> Iterator[str]:
    """Decoded documents of one flat token stream, split at EOS (a truncated last document is yielded as is)."""
    ids = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    cuts = np.flatnonzero(ids == eos_id)
    starts = np.concatenate([[0], cuts + 1])
    ends = np.concatenate([cuts, [len(ids)]])
    pending: list[list[int]] = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e > s:
            pending.append(ids[s:e].tolist())
        if len(pending) >= batch:
            yield from decode(pending)
            pending = []
    if pending:
        yield from decode(pending)
