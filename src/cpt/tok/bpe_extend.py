"""Extend a BPE ``tokenizer.json`` (byte-level: GPT-2, Llama-3, Qwen) with new-language merges.

HF BPE applies the lowest-ranked applicable merge first. New merges are appended AFTER every base merge, so on any
text the base merges all happen first and the base's final segmentation S is reached; a new merge can then fire only
where two adjacent tokens of S are exactly its pair. ``old_pairs`` collects those pairs from old-language text;
``learn_merges`` continues BPE training from the base's segmentation of the new-language words and never picks a
pair that is in that set or that ``cpt.tok.guard`` refuses, so every new merge is reachable and none fires on the
old-language training text.

Bases with ``ignore_merges`` (Llama-3) emit a whole pre-token word directly when it is in the vocabulary: a new token
equal to an old-language word would fire, so those words count as conflicts too.
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

from tokenizers import Tokenizer

from cpt.errors import ConfigError, DataError
from cpt.io import atomic_open, read_json, write_json
from cpt.layout import Layout
from cpt.tok.guard import Guard
from cpt.tok.spm_extend import SPACE

log = logging.getLogger(__name__)


def load(path: Path) -> tuple[Tokenizer, dict[str, Any]]:
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        tok = Tokenizer.from_str(json.dumps(spec))
    except Exception as exc:
        raise DataError(f"{path}: not a tokenizers tokenizer.json: {exc}") from exc
    if spec.get("model", {}).get("type") != "BPE":
        raise ConfigError(f"{path}: base model is {spec.get('model', {}).get('type')}; only BPE tokenizer.json bases")
    return tok, spec


def merge_pairs(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """Merges as pairs; tokenizers writes them as ["a", "b"] (new) or "a b" (old format)."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in spec["model"]["merges"]]


def base_size(spec: dict[str, Any]) -> int:
    ids = list(spec["model"]["vocab"].values()) + [t["id"] for t in spec.get("added_tokens", [])]
    return max(ids) + 1


def is_byte_level(spec: dict[str, Any]) -> bool:
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))


def readable(token: str, byte_level: bool) -> str:
    """A token as text with ▁ for spaces (what the guard and new_tokens.json read)."""
    if byte_level:
        raw = bytes(_unicode_to_bytes().get(c, 0x3F) for c in token)
        token = raw.decode("utf-8", errors="replace")
    return token.replace(" ", SPACE)


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {v: k for k, v in _bytes_to_unicode().items()}


def partial_char(token: str) -> bool:
    """A byte-level token holding part of a multi-byte character (no old-alphabet text can be spelled by it alone)."""
    raw = bytes(_unicode_to_bytes().get(c, 0x3F) for c in token)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte <-> printable-char table, as pre_tokenizers.ByteLevel.alphabet() builds it.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


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


def old_pairs(base: Tokenizer, spec: dict[str, Any], lines: Iterable[str]) -> tuple[set[tuple[str, str]], set[str]]:
    """Adjacent token pairs of the base's segmentation of old-language text (within a pre-token word), and, for
    ignore_merges bases, the pre-token words themselves."""
    pairs: set[tuple[str, str]] = set()
    words: set[str] = set()
    ignore = bool(spec["model"].get("ignore_merges"))
    batch = list(lines)
    for i in range(0, len(batch), 4096):
        for enc in base.encode_batch(batch[i:i + 4096], add_special_tokens=False):
            toks, wids = enc.tokens, enc.word_ids
            for j in range(1, len(toks)):
                if wids[j] is not None and wids[j] == wids[j - 1]:
                    pairs.add((toks[j - 1], toks[j]))
            if ignore:
                cur, last = "", None
                for t, w in zip(toks, wids):
                    if w != last and cur:
                        words.add(cur)
                        cur = ""
                    cur += t
                    last = w
                if cur:
                    words.add(cur)
    return pairs, words


def extend_bpe(base_ref, cfg: dict[str, Any], seed: int, new_text: dict[str, list[str]], old_text: list[str],
               layout: Layout, timings: dict[str, float]):
    from cpt.tok.sampling import vocab_size_for
    from cpt.tok.spm_family import Extension

    base, spec = load(base_ref.file)
    byte_level = is_byte_level(spec)
    vocab: dict[str, int] = spec["model"]["vocab"]
    t = time.perf_counter()
    pairs, words = old_pairs(base, spec, old_text)
    guard = None
    if cfg["guard"] == "native":
        guard = Guard(old_text, new_text,
                      min_freq=float(cfg["old_alphabet_min_freq"]), foreign_ratio=float(cfg["foreign_ratio"]))
    timings["choose"] = time.perf_counter() - t
    have = set(vocab)
    candidates: set[str] = set()

    def allowed(a: str, b: str) -> str | None:
        tok = a + b
        if tok not in have:
            candidates.add(tok)
        if (a, b) in pairs or tok in words:
            return "pruned_exact"
        # the guard judges the merge even when a+b is already a base token: the new merge (a, b) is what fires
        if guard is not None and not (byte_level and partial_char(tok)) and not guard.allows(readable(tok, byte_level)):
            return "pruned_guard"
        return None

    t = time.perf_counter()
    kept: list[tuple[str, str]] = []
    refused: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    for lang, lines in new_text.items():
        merges, why = learn_merges(base, lines, vocab_size_for(cfg, lang), allowed)
        refused.update(why)
        for m in merges:
            if m not in seen and (not cfg["max_added"] or len(have) - len(vocab) < cfg["max_added"]):
                seen.add(m)
                kept.append(m)
                have.add(m[0] + m[1])
    timings["train"] = time.perf_counter() - t
    counts = {"candidates": len(candidates), "pruned_exact": refused["pruned_exact"],
              "pruned_guard": refused["pruned_guard"], "pruned_unreachable": 0}

    t = time.perf_counter()
    n = base_size(spec)
    out_spec = json.loads(json.dumps(spec))
    added = list(dict.fromkeys(a + b for a, b in kept if a + b not in vocab))
    for i, tok in enumerate(added):
        out_spec["model"]["vocab"][tok] = n + i
    out_spec["model"]["merges"] = [list(m) for m in merge_pairs(spec)] + [list(m) for m in kept]
    out = layout.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "tokenizer.json") as fh:
        json.dump(out_spec, fh, ensure_ascii=False)
    cfg_path = base_ref.folder / "tokenizer_config.json" if base_ref.folder else None
    tcfg = read_json(cfg_path) if cfg_path and cfg_path.exists() else {}
    for k in ("added_tokens_decoder", "tokenizer_file", "vocab_file", "merges_file", "auto_map", "name_or_path"):
        tcfg.pop(k, None)
    tcfg["tokenizer_class"] = "TokenizersBackend"  # load our tokenizer.json verbatim
    write_json(out / "tokenizer_config.json", tcfg)
    if base_ref.folder and (base_ref.folder / "special_tokens_map.json").exists():
        write_json(out / "special_tokens_map.json", read_json(base_ref.folder / "special_tokens_map.json"))
    base_ids = [[t.id for t in base.model.tokenize(tok)] for tok in added]
    write_json(out / "new_tokens.json", {
        "base_vocab": n,
        "vocab": n + len(added),
        "added": [{"id": n + i, "piece": tok, "text": readable(tok, byte_level).replace(SPACE, " "), "base_ids": ids}
                  for i, (tok, ids) in enumerate(zip(added, base_ids))],
    })
    timings["write"] = time.perf_counter() - t

    from transformers import AutoTokenizer

    merged = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(out))
    hf._tokenizer.encode_special_tokens = True
    base.encode_special_tokens = merged.encode_special_tokens = True

    def enc(tk):
        return lambda lines: [e.ids for e in tk.encode_batch(lines, add_special_tokens=False)]

    return Extension(
        kind="bpe",
        base_file=base_ref.file,
        base_vocab=n,
        added=added,
        encode_base=enc(base),
        encode=enc(merged),
        encode_hf=enc(hf._tokenizer),
        decode_hf=lambda ids: hf.decode(ids),
        decode_base=lambda ids: base.decode(ids, skip_special_tokens=False),
        **counts,
    )
