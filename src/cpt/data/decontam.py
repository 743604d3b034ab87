"""Decontamination: drop training documents that share a long n-gram with any evaluation document.

GPT-3 style (13-grams of words), on the same simplified tokens as dedup (lowercase, punctuation dropped) but
without number folding, so "0 0 0 ..." tables cannot match each other. Chinese and Japanese have no spaces: their
n-grams are characters (``char_ngram``, default 25, about as much text as 13 words). An eval text shorter than n is
matched by its exact normalised-text hash instead (NTREX has one-line sentences). With ``short_min`` set (sft's
index does: held-out instructions are often a handful of words), an eval text of at least ``short_min[mode]`` but
fewer than n tokens is also matched as a whole token sequence anywhere in a training text: a near-copy that differs
in case, punctuation or spacing, or that sits inside a longer conversation, is found too.

The eval n-grams live in one sorted uint64 array; a training document's n-grams are checked with one
``np.searchsorted`` (no Python set lookups per n-gram).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cpt.data.dedup import CHAR_LANGS, Tokens, shingles, token_hashes
from cpt.data.textnorm import text_hash


@dataclass
class Hit:
    eval_source: str
    eval_id: str
    ngram: str


@dataclass
class EvalIndex:
    word_ngram: int = 13
    char_ngram: int = 25
    _parts: list[np.ndarray] = field(default_factory=list)
    _owners: list[np.ndarray] = field(default_factory=list)
    _ids: list[tuple[str, str]] = field(default_factory=list)
    _texts: dict[str, int] = field(default_factory=dict)
    # {"word": k, "char": k}: eval texts of k..n-1 tokens are matched as whole sequences (None: exact text only)
    short_min: dict[str, int] | None = None
    _short: dict[tuple[str, int], list[tuple[int, int]]] = field(default_factory=dict)
    short_keys: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    keys: np.ndarray | None = None
    owner: np.ndarray | None = None
    bitmap: np.ndarray | None = None  # 2^24-slot presence map of the keys' low bits: a cache-friendly prefilter

    BITMAP_BITS = 24

    def mode(self, lang: str) -> tuple[str, int]:
        return ("char", self.char_ngram) if lang in CHAR_LANGS else ("word", self.word_ngram)

    def add(self, text: str, lang: str, source: str, doc_id: str) -> None:
        owner = len(self._ids)
        self._ids.append((source, doc_id))
        self._texts.setdefault(text_hash(text), owner)
        mode, n = self.mode(lang)
        toks = token_hashes(text, mode)
        if len(toks) >= n:
            sh = shingles(toks.hashes(norm_numbers=False), n)
            self._parts.append(sh)
            self._owners.append(np.full(len(sh), owner, dtype=np.int32))
        elif self.short_min and len(toks) >= max(1, int(self.short_min.get(mode, n))):
            whole = shingles(toks.hashes(norm_numbers=False), len(toks))[0]
            self._short.setdefault((mode, len(toks)), []).append((int(whole), owner))
        self.keys = None

    def build(self) -> None:
        if self._parts:
            keys = np.concatenate(self._parts)
            owner = np.concatenate(self._owners)
            order = np.argsort(keys, kind="stable")
            self.keys, self.owner = keys[order], owner[order]
        else:
            self.keys, self.owner = np.zeros(0, np.uint64), np.zeros(0, np.int32)
        self.bitmap = np.zeros(1 << self.BITMAP_BITS, dtype=bool)
        self.bitmap[(self.keys & np.uint64((1 << self.BITMAP_BITS) - 1)).astype(np.intp)] = True
        self.short_keys = {}
        for key, rows in self._short.items():
            arr = np.array(sorted(rows), dtype=np.uint64).reshape(-1, 2)
            self.short_keys[key] = (arr[:, 0], arr[:, 1].astype(np.int64))

    @property
    def size(self) -> int:
        if self.keys is None:
            self.build()
        return len(self.keys)  # type: ignore[arg-type]

    def find(self, text: str, lang: str, tokens: Tokens | None = None) -> Hit | None:
        """The first eval n-gram (or whole eval text) found in ``text``; None if the text is clean."""
        if self.keys is None:
            self.build()
        owner = self._texts.get(text_hash(text))
        if owner is not None:
            src, eid = self._ids[owner]
            return Hit(src, eid, text[:80])
        mode, n = self.mode(lang)
        if self.short_keys:
            toks = tokens if tokens is not None else token_hashes(text, mode)
            hit = self._find_short(toks, mode)
            if hit is not None:
                return hit
        if not len(self.keys):  # type: ignore[arg-type]
            return None
        toks = tokens if tokens is not None else token_hashes(text, mode)
        if len(toks) < n:
            return None
        sh = shingles(toks.hashes(norm_numbers=False), n)
        # prefilter: only n-grams whose low 24 bits are present can be eval n-grams (a few % of them)
        maybe = np.flatnonzero(self.bitmap[(sh & np.uint64((1 << self.BITMAP_BITS) - 1)).astype(np.intp)])  # type: ignore[index]
        if not len(maybe):
            return None
        pos = np.searchsorted(self.keys, sh[maybe])  # type: ignore[arg-type]
        pos[pos == len(self.keys)] = 0  # type: ignore[arg-type]
        hit = np.flatnonzero(self.keys[pos] == sh[maybe])  # type: ignore[index]
        if not len(hit):
            return None
        i = int(maybe[hit[0]])
        pos = {i: pos[hit[0]]}
        src, eid = self._ids[int(self.owner[pos[i]])]  # type: ignore[index]
        return Hit(src, eid, toks.text(i, n, "" if mode == "char" else " "))

    def _find_short(self, toks: Tokens, mode: str) -> Hit | None:
        """A short eval text (``short_min``) found as a whole token sequence in ``toks``."""
        hashes = toks.hashes(norm_numbers=False)
        for (m, length), (keys, owners) in sorted(self.short_keys.items()):
            if m != mode or len(toks) < length:
                continue
            sh = shingles(hashes, length)
            pos = np.searchsorted(keys, sh)
            pos[pos == len(keys)] = 0
            hit = np.flatnonzero(keys[pos] == sh)
            if len(hit):
                i = int(hit[0])
                src, eid = self._ids[int(owners[pos[i]])]
                return Hit(src, eid, toks.text(i, length, "" if mode == "char" else " "))
        return None
