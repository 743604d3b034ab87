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
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer

from cpt.errors import ConfigError, DataError
from cpt.io import atomic_open, read_json, write_json
from cpt.layout import Layout
from cpt.tok import exact
from cpt.tok.bpe_learn import learn_merges
from cpt.tok.guard import Guard, in_letters_of
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


def old_pairs(encodings: Iterable[Any], ignore_merges: bool) -> tuple[set[tuple[str, str]], set[str]]:
    """Adjacent token pairs of the base's segmentation of old-language text (within a pre-token word), and, for
    ignore_merges bases, the pre-token words themselves. ``encodings``: the base's ``Encoding`` objects for the
    chooser's whole documents and its lines."""
    pairs: set[tuple[str, str]] = set()
    words: set[str] = set()
    for enc in encodings:
        toks, wids = enc.tokens, enc.word_ids
        for j in range(1, len(toks)):
            if wids[j] is not None and wids[j] == wids[j - 1]:
                pairs.add((toks[j - 1], toks[j]))
        if ignore_merges:
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


def reachable_merges(merges: list[tuple[str, str]], vocab: Iterable[str]) -> list[tuple[str, str]]:
    """The merges whose two sides the base vocabulary or an earlier kept merge provides (learned merges come in
    that order), after pruning removed some."""
    have = set(vocab)
    out = []
    for a, b in merges:
        if a in have and b in have:
            out.append((a, b))
            have.add(a + b)
    return out


def build(spec: dict[str, Any], kept: list[tuple[str, str]]) -> tuple[dict[str, Any], list[str]]:
    """The extended tokenizer.json spec: new tokens after every base id, new merges after every base merge."""
    n = base_size(spec)
    vocab = spec["model"]["vocab"]
    out = dict(spec)
    out["model"] = dict(spec["model"])
    added = list(dict.fromkeys(a + b for a, b in kept if a + b not in vocab))
    # Pin the base's added tokens (<s>, </s>, Llama-3's reserved specials) into the model vocabulary at their ids:
    # on load, tokenizers re-numbers an added token that the model does not know from the model's vocabulary size,
    # so once new tokens grow the model they would move (EOS no longer the base's EOS id) and take the ids of the
    # last new tokens (decoding " 모르겠습니다" as "<unk>": the Korean round-trip failures on a Tekken base).
    pinned = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t["content"] not in vocab}
    out["model"]["vocab"] = {**vocab, **pinned, **{tok: n + i for i, tok in enumerate(added)}}
    out["model"]["merges"] = [list(m) for m in merge_pairs(spec)] + [list(m) for m in kept]
    return out, added


def extend_bpe(base_ref, cfg: dict[str, Any], seed: int, new_text: dict[str, list[str]], old_docs: list[str],
               layout: Layout, timings: dict[str, float]):
    from cpt.tok.sampling import lines_of, vocab_size_for
    from cpt.tok.spm_family import Extension, hf_encoder

    base, spec = load(base_ref.file)
    byte_level = is_byte_level(spec)
    vocab: dict[str, int] = spec["model"]["vocab"]
    old_lines = lines_of(old_docs)
    t = time.perf_counter()
    base.encode_special_tokens = True  # as the shards stage loads it: special-token strings in text are text
    doc_enc = base.encode_batch(old_docs, add_special_tokens=False)
    line_enc = base.encode_batch(old_lines, add_special_tokens=False)
    pairs, words = old_pairs(doc_enc + line_enc, bool(spec["model"].get("ignore_merges")))
    docs = exact.View("documents", old_docs, hf_encoder(base), [e.ids for e in doc_enc])
    lines = exact.View("lines", old_lines, hf_encoder(base), [e.ids for e in line_enc])
    del doc_enc, line_enc
    guard = None
    if cfg["guard"] != "exact":
        guard = Guard(old_lines, new_text, min_freq=float(cfg["old_alphabet_min_freq"]),
                      foreign_ratio=float(cfg["foreign_ratio"]), mode=cfg["guard"])
    lex_pairs: set[tuple[str, str]] = set()
    lex_words: set[str] = set()
    lexicon_info: dict[str, int] = {}
    if cfg["guard"] == "lexicon":
        from cpt.tok import lexicon

        t_lex = time.perf_counter()
        forms = lexicon.word_forms(int(cfg["lexicon_size"]), old_lines, new_text)
        marks = lexicon.attached_marks(base, old_lines)
        lex_pairs, lex_words = lexicon.bpe_conflicts(
            base, forms, bool(spec["model"].get("ignore_merges")), marks,
            spell=(lambda text: "".join(_bytes_to_unicode()[b] for b in text.encode("utf-8"))) if byte_level else str)
        lex_pairs -= pairs
        lexicon_info = {**lexicon.summary(forms, lex_pairs), "lexicon_marks": len(marks)}
        timings["lexicon"] = time.perf_counter() - t_lex
    timings["choose"] = time.perf_counter() - t
    have = set(vocab)
    candidates: set[str] = set()

    def allowed(a: str, b: str) -> str | None:
        tok = a + b
        if tok not in have:
            candidates.add(tok)
        if (a, b) in pairs or tok in words:
            return "pruned_exact"
        if byte_level and partial_char(tok):
            # a token ending inside a multi-byte character (half a Hangul syllable) decodes to U+FFFD on its own:
            # streaming decode and new_tokens.json would show garbage; only whole characters are added
            return "pruned_partial"
        if ((a, b) in lex_pairs or tok in lex_words) and guard.old_spelled(readable(tok, byte_level)):
            return "pruned_guard"  # guard: lexicon -- an old-spelled merge that would change an English word form
        # the guard judges the merge even when a+b is already a base token: the new merge (a, b) is what fires
        if guard is not None and not guard.allows(readable(tok, byte_level)):
            return "pruned_guard"
        return None

    t = time.perf_counter()
    kept: list[tuple[str, str]] = []
    refused: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    for lang, text in new_text.items():
        merges, why = learn_merges(base, text, vocab_size_for(cfg, lang), allowed)
        refused.update(why)
        for m in merges:
            if m not in seen and (not cfg["max_added"] or len(have) - len(vocab) < cfg["max_added"]):
                seen.add(m)
                kept.append(m)
                have.add(m[0] + m[1])
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()

    def build_round(merges: list[tuple[str, str]]) -> exact.Built:
        out_spec, added = build(spec, merges)
        tok = Tokenizer.from_str(json.dumps(out_spec))
        inv = {i: w for w, i in out_spec["model"]["vocab"].items()}
        return exact.Built({"documents": hf_encoder(tok), "lines": hf_encoder(tok)}, lambda i: inv.get(i, str(i)))

    def prune(merges: list[tuple[str, str]], fired: set[str]) -> list[tuple[str, str]]:
        return reachable_merges([m for m in merges if m[0] + m[1] not in fired], vocab)

    n_before = len(kept)
    kept, _, summary = exact.fixed_point(kept, build_round, [docs, lines], prune)
    log.info("exactness fixed point: %d rounds, %d merges pruned (%s)", summary["rounds"], n_before - len(kept),
             ", ".join(readable(p, byte_level) for p in summary["examples"]))
    timings["choose"] += time.perf_counter() - t
    counts = {"candidates": len(candidates), "pruned_exact": refused["pruned_exact"],
              "pruned_guard": refused["pruned_guard"], "pruned_unreachable": 0}

    t = time.perf_counter()
    out_spec, added = build(spec, kept)
    n = base_size(spec)
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
    inv = {i: w for w, i in out_spec["model"]["vocab"].items()}
    return Extension(
        kind="bpe",
        base_file=base_ref.file,
        base_vocab=n,
        added=added,
        encode_base=hf_encoder(base),
        encode=hf_encoder(merged),
        encode_hf=hf_encoder(hf._tokenizer),
        decode_hf=lambda ids: hf.decode(ids),
        decode_base=lambda ids: base.decode(ids, skip_special_tokens=False),
        encode_docs_base=hf_encoder(base),
        encode_docs=hf_encoder(merged),
        token=lambda i: readable(inv.get(i, str(i)), byte_level),
        pruned_verified=n_before - len(kept),
        exact_rounds=summary["rounds"],
        extra={"chooser_docs": len(old_docs), "chooser_lines": len(old_lines),
               "in_old_letters": in_letters_of(old_lines),
               "pruned_partial_char": refused["pruned_partial"], **lexicon_info},
        **counts,
    )
