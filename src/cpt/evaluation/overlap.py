"""The role barrier, checked on what training actually saw.

``role: eval`` documents (and the held-out documents split off by the shards stage) must never be trained on. The
clean stage decontaminates at the n-gram level; this check is the last line: it splits the training shards the train
stage reads back into documents at EOS and looks each one up among the evaluation documents. A whole evaluation
document inside the training stream means the barrier broke somewhere upstream (a role lost, a source routed to the
wrong split, decontamination bypassed), which makes every number in the report meaningless, so the stage stops.

Matching is on token ids, not decoded text: each evaluation document is encoded with the shards' own tokenizer
(``cpt.tok.codec``, the shards stage's own rule: special-token strings in the text stay text) and the hash of its id sequence is looked up among the hashes of the
shard segments (special tokens stripped). That is exact for the same text and needs no decoding of the training
stream (decoding 10M tokens costs ~20 s on 2 cores; hashing the segments well under a second). The clean
``role: train`` records are checked on text (NFC, whitespace-normalised), which also catches near-verbatim copies.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from cpt.data.records import iter_docs
from cpt.errors import DataError
from cpt.evaluation.sources import heldout_groups
from cpt.io import read_json
from cpt.layout import Layout
from cpt.tok.codec import TextCodec

log = logging.getLogger("cpt.stages.eval")


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


def check_overlap(layout: Layout, cfg: dict) -> dict[str, Any]:
    """Eval (and held-out) documents found in the clean training records / the training shards; see overlap.py."""
    ocfg = cfg["overlap"]
    if not ocfg["enabled"]:
        return {"enabled": 0}
    eval_docs: dict[str, list[str]] = defaultdict(list)
    for doc in iter_docs(layout.clean, role="eval"):
        eval_docs[doc["source"]].append(doc["text"])
    heldout = [t for _, _, texts in heldout_groups(layout, cfg).values() for t in texts]

    encode, segments, tokens = None, [], 0
    if ocfg["shards"]:
        meta, streams = shard_streams(layout.resolve(ocfg["shards"]))
        # the shards' own text -> ids rule (cpt.tok.codec): a WikiText article full of literal <unk> encodes here
        # exactly as it would have been packed, so a copy inside the training stream is found
        codec = TextCodec.from_folder(layout.resolve(meta.get("tokenizer") or layout.tokenizer))
        encode = codec.encode
        specials = [i for i in (meta.get("bos_id"), codec.bos_id) if i is not None]
        for path in streams:
            segs = list(shard_segments(path, meta["dtype"], int(meta["eos_id"]), specials, ocfg["max_tokens"]))
            tokens += sum(len(s) for s in segs)
            segments.extend(segs)

    eval_index, held_index = OverlapIndex(), OverlapIndex()
    for src, texts in eval_docs.items():
        eval_index.add(src, texts, encode)
    held_index.add("heldout", heldout, encode)
    n_records, leaks_records, ex1 = eval_index.find_texts(d["text"] for d in iter_docs(layout.clean, role="train"))
    n_shard, leaks_shards, ex2 = eval_index.find_segments(segments)
    _, held_leaks, ex3 = held_index.find_segments(segments)
    result = {
        "enabled": 1,
        "eval_docs_indexed": sum(len(v) for v in eval_docs.values()),
        "heldout_docs_indexed": len(heldout),
        "train_records_checked": n_records,
        "shard_docs_checked": n_shard,
        "shard_tokens_checked": tokens,
        "eval_docs_in_train_records": sum(leaks_records.values()),
        "eval_docs_in_train_shards": sum(leaks_shards.values()),
        "heldout_docs_in_train_shards": sum(held_leaks.values()),
    }
    leaked = {k: leaks_records.get(k, 0) + leaks_shards.get(k, 0) for k in sorted(set(leaks_records) | set(leaks_shards))}
    if leaked and ocfg["fail"]:
        raise DataError(
            f"{layout.clean} / {ocfg['shards']}: evaluation documents found in the training data "
            f"({leaked}); e.g. {(ex1 + ex2)[:2]}. The role barrier is broken upstream; refusing to report "
            f"contaminated numbers (eval.overlap.fail: false to report anyway)"
        )
    if leaked:
        log.warning("evaluation documents found in the training data: %s", leaked)
    if held_leaks:
        log.warning("%d held-out documents also appear in the training shards (%s): heldout_* bpb is optimistic",
                    sum(held_leaks.values()), ex3[:1])
    return result
