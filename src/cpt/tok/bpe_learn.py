"""Continued BPE training on top of a base's final segmentation (the byte-level family's source of new merges)."""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from typing import Callable, Iterable

from tokenizers import Tokenizer


def pretokenized_counts(base: Tokenizer, lines: Iterable[str]) -> Counter[str]:
    """Pre-token words of the new-language text as the base splits them (its normaliser + pre-tokenizer)."""
    norm, pre = base.normalizer, base.pre_tokenizer
    counts: Counter[str] = Counter()
    for line in lines:
        text = norm.normalize_str(line) if norm is not None else line
        if pre is None:
            counts[text] += 1
        else:
            counts.update(w for w, _ in pre.pre_tokenize_str(text))
    return counts


def learn_merges(
    base: Tokenizer,
    lines: list[str],
    n_merges: int,
    allowed: Callable[[str, str], str | None],
    *,
    min_count: int = 2,
) -> tuple[list[tuple[str, str]], Counter[str]]:
    """Continue BPE training from the BASE's final segmentation of the new-language words.

    Why not train a fresh BPE and append its merges: a fresh model's merges assume its own intermediate tokens,
    which the base (whose merges run first) often never produces, so many appended merges are dead. Learning on top
    of the base's output makes every learned merge reachable by construction, and lets each candidate pair be
    checked against the old language as it is chosen. ``allowed(a, b)`` returns None or the reason it refuses.
    Standard incremental BPE (pair counts, pair -> words index, lazy max-heap); hand-written because no library
    trains merges on top of a fixed existing segmentation."""
    counts = pretokenized_counts(base, lines)
    words: list[list[str]] = []
    freqs: list[int] = []
    for w, f in counts.items():
        words.append([t.value for t in base.model.tokenize(w)])
        freqs.append(f)
    pair_count: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(words):
        for pair in zip(seq, seq[1:]):
            pair_count[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    refused: Counter[str] = Counter()
    banned: set[tuple[str, str]] = set()
    while heap and len(merges) < n_merges:
        neg, pair = heapq.heappop(heap)
        if -neg != pair_count.get(pair, 0) or pair in banned:
            continue  # stale heap entry
        if -neg < min_count:
            break
        reason = allowed(*pair)
        if reason:
            refused[reason] += 1
            banned.add(pair)
            continue
        merges.append(pair)
        a, b = pair
        new = a + b
        touched: set[tuple[str, str]] = set()
        for i in where.pop(pair, ()):
            seq, f = words[i], freqs[i]
            out: list[str] = []
            gone: set[int] = set()  # start positions (in seq) of pairs that disappear
            made: list[int] = []  # positions (in out) of the merged tokens
            j, n = 0, len(seq)
            while j < n:
                if j + 1 < n and seq[j] == a and seq[j + 1] == b:
                    gone.update(k for k in (j - 1, j, j + 1) if 0 <= k < n - 1)
                    made.append(len(out))
                    out.append(new)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            # only the pairs around each merged occurrence change: update those, not the whole word
            for k in gone:
                q = (seq[k], seq[k + 1])
                pair_count[q] -= f
                touched.add(q)
            for k in {k for m in made for k in (m - 1, m) if 0 <= k < len(out) - 1}:
                q = (out[k], out[k + 1])
                pair_count[q] += f
                where[q].add(i)
                touched.add(q)
            words[i] = out
        touched.discard(pair)
        for q in touched:
            if pair_count[q] > 0:
                heapq.heappush(heap, (-pair_count[q], q))
        pair_count.pop(pair, None)
    return merges, refused
