"""Extend a BPE ``tokenizer.json`` (byte-level: GPT-2, Llama-3, Qwen) with new-language merges.

HF BPE applies the lowest-ranked applicable merge first. New merges are appended AFTER every base merge, so on any
text the base merges all happen first and the base's final segmentation S is reached; a new merge can then fire only
where two adjacent tokens of S are exactly its pair. ``old_pairs`` collects those pairs from old-language text and
the merges that match are pruned; ``cpt.tok.guard`` handles held-out safety as for SentencePiece. A merge whose
inputs are no longer producible (a pruned merge made them) is dropped, and so is everything built on it.

Bases with ``ignore_merges`` (Llama-3) emit a whole pre-token word directly when it is in the vocabulary: a new token
equal to an old-language word would fire, so those words count as conflicts too.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE

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
        table = {v: k for k, v in _bytes_to_unicode().items()}
        raw = bytes(table.get(c, 0x3F) for c in token)
        token = raw.decode("utf-8", errors="replace")
    return token.replace(" ", SPACE)


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


def train_new_merges(spec: dict[str, Any], lines: list[str], vocab_size: int) -> list[tuple[str, str]]:
    """A BPE with the base's normaliser and pre-tokenizer trained on new-language lines; its merges, in order."""
    shell = dict(spec)
    shell["added_tokens"] = []
    shell["post_processor"] = None
    shell["model"] = {"type": "BPE", "vocab": {}, "merges": [], "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                      "byte_fallback": False, "ignore_merges": False}
    tok = Tokenizer.from_str(json.dumps(shell))
    alphabet = pre_tokenizers.ByteLevel.alphabet() if is_byte_level(spec) else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False,
                                  min_frequency=2)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return merge_pairs(json.loads(tok.to_str()))


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


def choose(new_merges, base_vocab: dict[str, int], pairs, words, guard: Guard | None, byte_level: bool,
           max_added: int) -> tuple[list[tuple[str, str]], dict[str, int]]:
    have = set(base_vocab)
    kept: list[tuple[str, str]] = []
    counts = {"candidates": 0, "pruned_exact": 0, "pruned_guard": 0, "pruned_unreachable": 0}
    for a, b in new_merges:
        tok = a + b
        if tok in base_vocab:
            continue
        counts["candidates"] += 1
        if (a, b) in pairs or tok in words:
            counts["pruned_exact"] += 1
        elif guard is not None and not guard.allows(readable(tok, byte_level)):
            counts["pruned_guard"] += 1
        elif a not in have or b not in have or tok in have:
            counts["pruned_unreachable"] += 1
        elif max_added and len(kept) >= max_added:
            continue
        else:
            kept.append((a, b))
            have.add(tok)
    return kept, counts


def extend_bpe(base_ref, cfg: dict[str, Any], seed: int, new_text: dict[str, list[str]], old_text: list[str],
               layout: Layout, timings: dict[str, float]):
    from cpt.tok.spm_family import Extension
    from cpt.tokenizer import vocab_size_for

    base, spec = load(base_ref.file)
    byte_level = is_byte_level(spec)
    vocab: dict[str, int] = spec["model"]["vocab"]
    t = time.perf_counter()
    per_lang = {lang: train_new_merges(spec, lines, vocab_size_for(cfg, lang)) for lang, lines in new_text.items()}
    # Merges are ordered (a later merge may build on an earlier one), so languages are concatenated, not interleaved.
    new_merges = [m for merges in per_lang.values() for m in merges]
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    pairs, words = old_pairs(base, spec, old_text)
    guard = None
    if cfg["guard"] == "native":
        guard = Guard(old_text, [x for lines in new_text.values() for x in lines],
                      min_freq=float(cfg["old_alphabet_min_freq"]))
    kept, counts = choose(new_merges, vocab, pairs, words, guard, byte_level, cfg["max_added"])
    timings["choose"] = time.perf_counter() - t

    t = time.perf_counter()
    n = base_size(spec)
    out_spec = json.loads(json.dumps(spec))
    added = [a + b for a, b in kept]
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
        **counts,
    )
