"""Documents -> packed fixed-length token blocks in flat binary files (the format of docs/architecture.md).

The pieces, each small and separately tested:

- ``val_score`` / ``is_val``: the deterministic train/val split by document. A document's score is a hash of
  ``seed`` and its id mapped to [0, 1); it is held out when ``score < val_fraction``. Because the score does not
  depend on the fraction, the held-out set at a larger fraction CONTAINS the one at a smaller fraction: the base
  stage holds out old-domain documents at ``base.tiny.val_fraction`` and the shards stage at ``shards.val_fraction``
  with the same seed, so when the first is >= the second the builtin base never trained on a document that eval
  later scores as "held out" (no inflated base numbers, no overstated forgetting).
- ``load_tokenizer`` / ``special_ids``: the fast ``tokenizers`` backend of an HF tokenizer folder, and the BOS/EOS
  convention read from the tokenizer itself (its post-processor says whether it prepends BOS, e.g. Llama's ``<s>``).
- ``encode_pipelined``: ``encode_batch_fast`` on batches of documents in a worker thread (it releases the GIL and
  runs on every core through rayon) while the caller packs the previous batch, so packing costs almost nothing on top
  of tokenisation (bench/bench_shards.py measures it).
- ``BlockWriter``: appends each document as ``[BOS] ids EOS`` to one stream and writes full blocks only. The tail
  that does not fill a last block is DROPPED and counted (``tail_tokens``), never padded: a pad would be a target
  the model learns from, and carrying it to another split would leak text across the split. The bytes, document
  and language counts are corrected for the dropped tail, so ``bytes`` is the UTF-8 size of exactly the text behind
  the tokens in the file (to within one character), which is what bits-per-byte needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

import numpy as np

from cpt.errors import DataError

_EOS_FALLBACKS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")


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

    def route(self, doc_id: str, item: Any) -> list[tuple[str, Any]]:
        self.n_seen += 1
        if self.val_fraction <= 0:
            self.n_train += 1
            return [("train", item)]
        score = val_score(doc_id, self.seed)
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

def load_tokenizer(folder: str | Path):
    """``tokenizers.Tokenizer`` from an HF tokenizer folder's ``tokenizer.json`` (what AutoTokenizer's fast backend
    loads; reading it directly keeps transformers off the hot path).

    Special-token strings inside documents (a "</s>" or "<unk>" in the text) are encoded as the text they are
    (``encode_special_tokens``, like ``split_special_tokens=True`` in transformers): a document must never inject
    a real EOS/BOS id into the stream. The only special ids in the shards are the BOS/EOS the packer adds."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        raise DataError(f"{path}: no tokenizer.json; the tokenizer stage (or an HF fast tokenizer) writes it")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust error says what is wrong with the file
        raise DataError(f"{path}: cannot load tokenizer: {exc}") from exc
    tok.encode_special_tokens = True
    return tok


def _config_token(folder: Path, key: str) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.exists():
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                return value
    return None


@dataclass(frozen=True)
class Specials:
    bos_id: int | None  # prepended to every document, or None when the tokenizer's convention has no BOS
    eos_id: int  # appended to every document


def special_ids(tok, folder: str | Path, *, eos_token: str = "auto", add_bos: str | bool = "auto") -> Specials:
    """EOS from the folder's tokenizer_config (or the usual names); BOS from the tokenizer's own post-processor
    (``auto``: prepend exactly what ``add_special_tokens=True`` prepends, e.g. Llama's ``<s>``; GPT-2 has none)."""
    folder = Path(folder)
    name = _config_token(folder, "eos_token") if eos_token == "auto" else eos_token
    candidates = [name] if name else list(_EOS_FALLBACKS)
    eos_id = next((tok.token_to_id(c) for c in candidates if c and tok.token_to_id(c) is not None), None)
    if eos_id is None:
        raise DataError(f"{folder}: no EOS token found (tried {candidates}); set shards.eos_token")
    if add_bos == "auto":
        plain = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
        prefix = full[: len(full) - len(plain)] if full[len(full) - len(plain):] == plain else full[:1]
        bos_id = prefix[0] if len(prefix) == 1 and prefix[0] != eos_id else None
    elif add_bos in (True, "true"):
        name = _config_token(folder, "bos_token") or "<s>"
        bos_id = tok.token_to_id(name)
        if bos_id is None:
            raise DataError(f"{folder}: shards.add_bos is true but the tokenizer has no BOS token {name!r}")
    else:
        bos_id = None
    return Specials(bos_id=bos_id, eos_id=eos_id)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab < 65536), else uint32 (architecture.md)."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def encode_pipelined(tok, batches: Iterable[list[Any]], text_of=lambda d: d["text"]) -> Iterator[tuple[list, list]]:
    """Yield ``(batch, encodings)``, encoding batch k+1 in a worker thread while the caller consumes batch k.

    ``encode_batch_fast`` (no offsets) parallelises over the batch with rayon and releases the GIL, so the caller's
    Python packing overlaps the Rust tokenisation instead of adding to it."""
    it = iter(batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpt-encode") as pool:
        def submit(batch):
            return batch, pool.submit(tok.encode_batch_fast, [text_of(d) for d in batch], add_special_tokens=False)

        nxt = next(it, None)
        pending = submit(nxt) if nxt is not None else None
        while pending is not None:
            batch, fut = pending
            nxt = next(it, None)
            pending = submit(nxt) if nxt is not None else None
            yield batch, fut.result()


# -- the writer -----------------------------------------------------------------------------------------------------

@dataclass
class _Recent:
    """A document whose tokens may still fall in the (unwritten) tail of the stream."""
    text: str
    lang: str
    n_tokens: int  # including BOS/EOS
    n_bos: int
    n_text: int
    nbytes: int


@dataclass
class SplitStats:
    tokens: int = 0
    blocks: int = 0
    docs: int = 0
    bytes: int = 0
    tail_tokens: int = 0
    langs: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens, "blocks": self.blocks, "docs": self.docs, "bytes": self.bytes,
            "tail_tokens": self.tail_tokens, "langs": dict(sorted(self.langs.items())),
        }


class BlockWriter:
    """Packs documents into one stream of ``block_size``-token blocks written to ``fh`` (a binary file).

    ``add(ids, text, lang)`` appends ``[BOS] ids EOS``; full blocks go to disk in large writes; ``finish(tok)`` drops
    the tail and corrects the counts for it (``tok`` re-encodes the one or two cut documents with offsets)."""

    def __init__(self, fh: BinaryIO, block_size: int, dtype: np.dtype, specials: Specials,
                 flush_tokens: int = 1 << 20):
        if block_size < 2:
            raise ValueError("block_size must be >= 2")
        self.fh, self.block_size, self.specials = fh, block_size, specials
        self.dtype = np.dtype(dtype).newbyteorder("<")  # the files are little-endian on every machine
        self.flush_tokens = max(flush_tokens, block_size)
        self.stats = SplitStats()
        self._parts: list[np.ndarray] = []
        self._buffered = 0
        self._recent: deque[_Recent] = deque()
        self._recent_tokens = 0  # tokens of the docs in _recent

    def add(self, ids: Sequence[int], text: str, lang: str) -> None:
        pre = [self.specials.bos_id] if self.specials.bos_id is not None else []
        arr = np.empty(len(pre) + len(ids) + 1, dtype=self.dtype)
        if pre:
            arr[0] = pre[0]
        arr[len(pre):-1] = ids
        arr[-1] = self.specials.eos_id
        self._parts.append(arr)
        self._buffered += arr.size
        st = self.stats
        st.tokens += arr.size
        st.docs += 1
        nbytes = len(text.encode("utf-8"))
        st.bytes += nbytes
        st.langs[lang] = st.langs.get(lang, 0) + arr.size
        # Remember only the documents that can still reach into the final partial block.
        self._recent.append(_Recent(text, lang, arr.size, len(pre), len(ids), nbytes))
        self._recent_tokens += arr.size
        while self._recent and self._recent_tokens - self._recent[0].n_tokens >= self.block_size:
            self._recent_tokens -= self._recent.popleft().n_tokens
        if self._buffered >= self.flush_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._parts:
            return
        flat = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        full = (flat.size // self.block_size) * self.block_size
        if full:
            self.fh.write(memoryview(np.ascontiguousarray(flat[:full])))
            self.stats.blocks += full // self.block_size
        rest = flat[full:]
        self._parts = [rest] if rest.size else []
        self._buffered = rest.size

    def finish(self, tok=None) -> SplitStats:
        self._flush()
        tail = self._buffered
        self._parts, self._buffered = [], 0
        st = self.stats
        st.tail_tokens = tail
        st.tokens -= tail
        drop = tail
        for doc in reversed(self._recent):
            if drop <= 0:
                break
            cut = min(drop, doc.n_tokens)
            kept = doc.n_tokens - cut
            st.langs[doc.lang] -= cut
            if kept == 0:
                st.docs -= 1
                st.bytes -= doc.nbytes
            else:
                st.bytes -= doc.nbytes - _kept_bytes(tok, doc, kept)
            drop -= cut
        st.langs = {k: v for k, v in st.langs.items() if v > 0}
        return st


def _kept_bytes(tok, doc: _Recent, kept_tokens: int) -> int:
    """UTF-8 bytes of the text behind the first ``kept_tokens`` tokens (BOS included) of a cut document."""
    kept_text = min(max(kept_tokens - doc.n_bos, 0), doc.n_text)
    if kept_text == 0:
        return 0
    if kept_text >= doc.n_text:
        return doc.nbytes
    if tok is None:  # proportional estimate when no tokenizer is at hand (tests of the writer alone)
        return doc.nbytes * kept_text // doc.n_text
    offsets = tok.encode(doc.text, add_special_tokens=False).offsets
    end = offsets[kept_text - 1][1]
    return len(doc.text[:end].encode("utf-8"))


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
