"""Documents -> packed fixed-length token blocks in flat binary files (the format of docs/architecture.md).

The pieces, each small and separately tested:

- ``val_score`` / ``is_val``: the deterministic train/val split by document. A document's score is a hash of
  ``seed`` and its id mapped to [0, 1); it is held out when ``score < val_fraction``. Because the score does not
  depend on the fraction, the held-out set at a larger fraction CONTAINS the one at a smaller fraction: the base
  stage holds out old-domain documents at ``base.tiny.val_fraction`` and the shards stage at ``shards.val_fraction``
  with the same seed, so when the first is >= the second the builtin base never trained on a document that eval
  later scores as "held out" (no inflated base numbers, no overstated forgetting).
- ``load_tokenizer`` / ``special_ids`` (from ``cpt.tok.codec``, cpt's one text -> ids rule): the fast
  ``tokenizers`` backend of an HF tokenizer folder, and the BOS/EOS convention read from the tokenizer itself.
- ``encode_pipelined``: ``encode_batch_fast`` on batches of documents in a worker thread (it releases the GIL and
  runs on every core through rayon) while the caller packs the previous batch, so packing costs almost nothing on top
  of tokenisation (bench/bench_shards.py measures it).
- ``BlockWriter``: appends each document as ``[BOS] ids EOS`` to one stream and writes full blocks only. The tail
  that does not fill a last block is DROPPED and counted (``tail_tokens``), never padded: a pad would be a target
  the model learns from, and carrying it to another split would leak text across the split. The bytes, document
  and language counts are of the written blocks only, and every block has a ``block_info`` row (its language and the
  exact UTF-8 bytes behind its targets, ``cpt.data.block_bytes``), so bits per byte is exact on any subset.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

import numpy as np

from cpt.data.block_bytes import block_info, token_bytes
from cpt.errors import DataError
from cpt.tok.codec import Specials, TextCodec, load_tokenizer, special_ids  # noqa: F401 - the one tokenization



# -- the split ------------------------------------------------------------------------------------------------------

def val_score(doc_id: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for a document (blake2b of seed and id; no Python hash salt)."""
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_val(doc_id: str, seed: int, val_fraction: float) -> bool:
    return val_score(doc_id, seed) < val_fraction


def val_ids(doc_ids: Sequence[str], seed: int, val_fraction: float) -> set[str]:
    """The held-out ids of one domain (what ``StreamSplit`` decides in one streaming pass, computed from all ids).

    A document is val when its score is below ``val_fraction``, with two domain-level corrections so small domains
    (the 29 English books) still get both splits: if no document is val and there are two or more, the
    lowest-scoring one is; if every document is val, the highest-scoring one trains. The lowest score is held out
    by every larger fraction too, so the containment property of the module docstring survives the corrections."""
    if val_fraction <= 0 or not doc_ids:
        return set()
    scores = {d: val_score(d, seed) for d in doc_ids}
    held = {d for d, s in scores.items() if s < val_fraction}
    if not held and len(scores) >= 2:
        held = {min(scores, key=scores.__getitem__)}
    if held and len(held) == len(scores):
        held.discard(max(scores, key=scores.__getitem__))
    return held


class StreamSplit:
    """The same decision as ``val_ids``, made while streaming documents of unknown number.

    ``route(doc_id, item)`` returns the ``(split, item)`` pairs that can be emitted now; ``finish()`` the rest. Two
    items are held back until the end: the lowest-scoring train document (it becomes val if no document was) and
    the highest-scoring val document (it becomes train if no document trained). So a held item reaches its split's
    stream last instead of in corpus order; that is deterministic and the only reordering."""

    def __init__(self, seed: int, val_fraction: float):
        self.seed, self.val_fraction = seed, val_fraction
        self.n_train = self.n_val = 0  # emitted so far
        self.n_seen = 0
        self._low: tuple[float, Any] | None = None  # lowest-scoring train candidate
        self._high: tuple[float, Any] | None = None  # highest-scoring val candidate

    def route(self, doc_id: str | None, item: Any, score: float | None = None) -> list[tuple[str, Any]]:
        """``score``: ``val_score(doc_id, seed)`` when the caller computed it already (the shards stage's tasks do)."""
        self.n_seen += 1
        if self.val_fraction <= 0:
            self.n_train += 1
            return [("train", item)]
        if score is None:
            score = val_score(str(doc_id), self.seed)
        out: list[tuple[str, Any]] = []
        if score < self.val_fraction:
            if self._high is None or score > self._high[0]:
                if self._high is not None:
                    out.append(("val", self._high[1]))
                self._high = (score, item)
            else:
                out.append(("val", item))
        elif self._low is None or score < self._low[0]:
            if self._low is not None:
                out.append(("train", self._low[1]))
            self._low = (score, item)
        else:
            out.append(("train", item))
        for split, _ in out:
            if split == "val":
                self.n_val += 1
            else:
                self.n_train += 1
        return out

    def finish(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        low, high = self._low, self._high
        self._low = self._high = None
        if high is not None:
            out.append(("val" if (low is not None or self.n_train) else "train", high[1]))
        if low is not None:
            has_val = self.n_val > 0 or high is not None  # with a train doc held, a held val doc stays val
            out.append(("val" if not has_val and self.n_seen >= 2 else "train", low[1]))
        return out


# -- the tokenizer --------------------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab < 65536), else uint32 (architecture.md)."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def encode_pipelined(tok, batches: Iterable[list[Any]], text_of=lambda d: d["text"],
                     offsets: bool = False) -> Iterator[tuple[list, list]]:
    """Yield ``(batch, encodings)``, encoding batch k+1 in a worker thread while the caller consumes batch k.

    ``encode_batch_fast`` (no offsets; ``encode_batch`` with ``offsets``, which the shards stage needs for the bytes
    behind each token and costs about the same) parallelises over the batch with rayon and releases the GIL, so the
    caller's Python packing overlaps the Rust tokenisation instead of adding to it."""
    it = iter(batches)
    encode = tok.encode_batch if offsets else tok.encode_batch_fast
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpt-encode") as pool:
        def submit(batch):
            return batch, pool.submit(encode, [text_of(d) for d in batch], add_special_tokens=False)

        nxt = next(it, None)
        pending = submit(nxt) if nxt is not None else None
        while pending is not None:
            batch, fut = pending
            nxt = next(it, None)
            pending = submit(nxt) if nxt is not None else None
            yield batch, fut.result()


# -- the writer -----------------------------------------------------------------------------------------------------

@dataclass
class SplitStats:
    tokens: int = 0
    blocks: int = 0
    docs: int = 0
    bytes: int = 0
    tail_tokens: int = 0
    langs: dict[str, int] = field(default_factory=dict)
    lang_index: list[str] = field(default_factory=list)  # block_info's language column -> language
    block_info: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens, "blocks": self.blocks, "docs": self.docs, "bytes": self.bytes,
            "tail_tokens": self.tail_tokens, "langs": dict(sorted(self.langs.items())),
            "lang_index": list(self.lang_index),
        }


def frame(ids: Sequence[int], text: str, offsets: Sequence[tuple[int, int]] | None, specials: Specials,
          dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A document as the blocks hold it, ``[BOS] ids EOS``, and the UTF-8 bytes behind each of those tokens."""
    pre = [specials.bos_id] if specials.bos_id is not None else []
    n = len(pre) + len(ids) + 1
    arr = np.empty(n, dtype=dtype)
    if pre:
        arr[0] = pre[0]
    arr[len(pre):-1] = ids
    arr[-1] = specials.eos_id
    nbytes = np.zeros(n, dtype=np.int64)
    if offsets is not None:
        nbytes[len(pre):-1] = token_bytes(text, offsets)
    elif len(ids):
        total = len(text.encode("utf-8"))
        nbytes[len(pre):-1] = total // len(ids)
        nbytes[len(pre)] += total - (total // len(ids)) * len(ids)
    return arr, nbytes


class BlockWriter:
    """Packs documents into one stream of ``block_size``-token blocks written to ``fh`` (a binary file).

    ``add(ids, text, lang, offsets)`` appends ``[BOS] ids EOS`` with the UTF-8 bytes behind every token
    (``cpt.data.block_bytes``; BOS/EOS own none); full blocks go to disk in large writes, with one ``block_info`` row
    each; ``finish()`` drops the tail. Every count (tokens, bytes, documents, tokens per language) is of what is in
    the file, exactly: the bytes are summed over the written tokens, not corrected afterwards."""

    def __init__(self, fh: BinaryIO, block_size: int, dtype: np.dtype, specials: Specials,
                 flush_tokens: int = 1 << 20, info_fh: BinaryIO | None = None):
        if block_size < 2:
            raise ValueError("block_size must be >= 2")
        self.fh, self.block_size, self.specials = fh, block_size, specials
        self.dtype = np.dtype(dtype).newbyteorder("<")  # the files are little-endian on every machine
        self.flush_tokens = max(flush_tokens, block_size)
        self.stats = SplitStats()
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (ids, bytes, language) per document
        self._buffered = 0
        self._written = 0  # tokens written so far
        self._starts: deque[int] = deque()  # stream offsets of documents that may still lie wholly in the tail
        self._info: list[np.ndarray] = []
        # with ``info_fh``, the block_info rows (16 bytes per block: 2.4 GB for 100 GB of text) go to that file as
        # raw little-endian int64 instead of memory, and ``finish`` leaves ``stats.block_info`` empty
        self.info_fh = info_fh

    def add(self, ids: Sequence[int], text: str, lang: str, offsets: Sequence[tuple[int, int]] | None = None) -> None:
        """``offsets``: the tokenizer's character spans of ``ids`` (exact bytes per token); without them (tests of
        the writer alone) the document's bytes are spread evenly over its tokens, still summing to the text's."""
        self.add_framed(*frame(ids, text, offsets, self.specials, self.dtype), lang)

    def add_framed(self, arr: np.ndarray, nbytes: np.ndarray, lang: str) -> None:
        """One document already framed by ``frame`` (``[BOS] ids EOS`` and the bytes behind each token): the shards
        stage frames documents in engine tasks and packs them here, in corpus order."""
        n = len(arr)
        if lang not in self.stats.lang_index:
            self.stats.lang_index.append(lang)
        langs = np.full(n, self.stats.lang_index.index(lang), dtype=np.int16)
        self._starts.append(self._written + self._buffered)
        self._parts.append((np.asarray(arr, dtype=self.dtype), np.asarray(nbytes, dtype=np.int64), langs))
        self._buffered += n
        self.stats.docs += 1
        if self._buffered >= self.flush_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._parts:
            return
        ids, nbytes, langs = (np.concatenate(c) for c in zip(*self._parts))
        full = (ids.size // self.block_size) * self.block_size
        if full:
            self.fh.write(memoryview(np.ascontiguousarray(ids[:full])))
            st = self.stats
            st.blocks += full // self.block_size
            st.tokens += full
            st.bytes += int(nbytes[:full].sum())
            counts = np.bincount(langs[:full], minlength=len(st.lang_index))
            for k, c in enumerate(counts):
                if c:
                    st.langs[st.lang_index[k]] = st.langs.get(st.lang_index[k], 0) + int(c)
            rows = block_info(nbytes[:full], langs[:full], self.block_size)
            if self.info_fh is not None:
                self.info_fh.write(np.ascontiguousarray(rows, dtype="<i8").tobytes())
            else:
                self._info.append(rows)
            self._written += full
            while self._starts and self._starts[0] < self._written:
                self._starts.popleft()
        self._parts = [(ids[full:], nbytes[full:], langs[full:])] if ids.size > full else []
        self._buffered = ids.size - full

    def finish(self, tok=None) -> SplitStats:
        """Drop the tail (``tok`` is accepted for compatibility; the bytes need no re-encoding any more)."""
        self._flush()
        st = self.stats
        st.tail_tokens = self._buffered
        st.docs -= len(self._starts)  # documents wholly in the dropped tail
        self._parts, self._buffered, self._starts = [], 0, deque()
        st.block_info = np.concatenate(self._info) if self._info else np.zeros((0, 2), dtype=np.int64)
        return st


def tokenizers_parallelism(enabled: bool = True):
    """Context manager: TOKENIZERS_PARALLELISM on inside the stage (the tests' conftest turns it off globally to
    keep forked test helpers safe), restored afterwards."""
    import contextlib

    @contextlib.contextmanager
    def _ctx():
        old = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = old

    return _ctx()
