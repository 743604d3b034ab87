"""Stage ``tokenizer``: extend the base tokenizer for the new languages without touching the old one.

Reads ``data/clean`` (new pieces are trained ONLY on ``role: train, domain: new`` text; the old-language chooser is
``role: train, domain: old``; every number in the report is measured on ``role: eval`` text) and the base tokenizer
(``tokenizer.base``: a folder, a ``tokenizer.model`` or a ``tokenizer.json``; default ``data/base``). Writes
``data/tokenizer/`` (an HF tokenizer folder + ``new_tokens.json``) and ``reports/fertility.md``.

The method, per base family:

- SentencePiece BPE (Llama-2, Mistral, TinyLlama, the builtin tiny base): ``cpt.tok.spm_extend`` (new pieces scored
  below every base piece, exact pruning on old text, ``cpt.tok.guard`` for held-out safety) and
  ``cpt.tok.hf_export`` (a ``tokenizer.json`` that encodes exactly like the merged ``.model``; checked here).
- byte-level BPE ``tokenizer.json`` (GPT-2, Llama-3, Qwen): ``cpt.tok.bpe_extend`` (new merges ranked after every
  base merge, pruned the same way).
"""

from __future__ import annotations

import hashlib
import logging
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from cpt.errors import ConfigError, DataError
from cpt.io import atomic_open
from cpt.layout import Layout
from cpt.params import stage_config
from cpt.progress import progress
from cpt.records import iter_docs, select_sources
from cpt.tok import fertility as fert

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "base": "",
    "languages": [],
    "vocab_size": {"vi": 8000, "zh": 8000, "ja": 8000, "ko": 4000},  # other languages: DEFAULT_VOCAB
    "model_type": "bpe",
    "character_coverage": 0.9995,
    "max_train_chars": 5_000_000,
    "old_max_chars": 5_000_000,
    "guard": "native",
    "old_alphabet_min_freq": 1.0e-4,
    "foreign_ratio": 1.0,
    "max_added": 0,
    "check_lines": 2000,
    "num_threads": 2,
    "strict": True,
}
GUARDS = ("native", "exact")
DEFAULT_VOCAB = 8000


def config(params: dict[str, Any]) -> dict[str, Any]:
    cfg = stage_config(params, "tokenizer", DEFAULTS)
    if cfg["guard"] not in GUARDS:
        raise ConfigError(f"tokenizer.guard: {cfg['guard']!r}; expected one of {GUARDS}")
    if cfg["model_type"] not in ("bpe", "unigram"):
        raise ConfigError(f"tokenizer.model_type: {cfg['model_type']!r}; expected 'bpe' or 'unigram'")
    for key in ("max_train_chars", "old_max_chars", "check_lines", "num_threads", "max_added"):
        if not isinstance(cfg[key], int) or cfg[key] < 0:
            raise ConfigError(f"tokenizer.{key}: {cfg[key]!r}; expected a non-negative integer")
    return cfg


def vocab_size_for(cfg: dict[str, Any], lang: str) -> int:
    v = cfg["vocab_size"]
    if isinstance(v, dict):
        v = v.get(lang, DEFAULT_VOCAB)
    if not isinstance(v, int) or v < 100:
        raise ConfigError(f"tokenizer.vocab_size for {lang}: {v!r}; expected an integer >= 100")
    return v


# -- the base tokenizer -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    kind: str  # "spm" | "bpe"
    file: Path  # tokenizer.model or tokenizer.json
    folder: Path | None  # the folder holding HF config files, if any


def find_base(cfg: dict[str, Any], layout: Layout) -> Base:
    path = layout.resolve(cfg["base"]) if cfg["base"] else layout.base
    if path.is_dir():
        if (path / "tokenizer.model").exists():
            return Base("spm", path / "tokenizer.model", path)
        if (path / "tokenizer.json").exists():
            return Base("bpe", path / "tokenizer.json", path)
        raise DataError(f"{path}: tokenizer.base folder has neither tokenizer.model nor tokenizer.json")
    if path.is_file():
        if path.suffix == ".json":
            return Base("bpe", path, path.parent if (path.parent / "tokenizer_config.json").exists() else None)
        return Base("spm", path, path.parent if (path.parent / "tokenizer_config.json").exists() else None)
    hint = " (run `cpt base` first)" if not cfg["base"] else ""
    raise DataError(f"{path}: tokenizer.base not found{hint}")


# -- text ---------------------------------------------------------------------------------------------------------


def _lines(docs: Iterable[dict[str, Any]]) -> Iterator[str]:
    for doc in docs:
        for line in unicodedata.normalize("NFC", doc["text"]).split("\n"):
            if line.strip():
                yield line


def _keep(doc_id: str, seed: int, fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def sample_lines(folder: Path, seed: int, max_chars: int, **filters: str) -> list[str]:
    """Lines of the matching documents, a seeded document sample when the text exceeds ``max_chars`` (0 = all).
    Sampling by hashed document id keeps it deterministic and independent of file order."""
    total = sum(len(d["text"]) for d in iter_docs(folder, **filters))
    fraction = 1.0 if not max_chars or total <= max_chars else max_chars / total
    out: list[str] = []
    for doc in iter_docs(folder, **filters):
        if fraction >= 1.0 or _keep(str(doc.get("id")), seed, fraction):
            out.extend(_lines([doc]))
    return out


def eval_lines(folder: Path, lang: str, limit: int) -> list[str]:
    lines = list(_lines(iter_docs(folder, role="eval", lang=lang)))
    return lines[:limit] if limit else lines


def new_languages(cfg: dict[str, Any], layout: Layout) -> list[str]:
    present: list[str] = []
    for s in select_sources(layout.clean, role="train", domain="new"):
        if s.lang not in present:
            present.append(s.lang)
    wanted = list(cfg["languages"] or present)
    missing = [lang for lang in wanted if lang not in present]
    if missing:
        raise DataError(f"{layout.clean}: no role: train, domain: new documents for tokenizer.languages {missing}")
    if not wanted:
        raise DataError(f"{layout.clean}: no role: train, domain: new sources to train new pieces on")
    return wanted


def interleave(ranked: dict[str, list[str]]) -> list[str]:
    """One list, best first, from each language's ranked pieces: by relative rank, so a 4k-piece language and an
    8k-piece one share the top of the priority order fairly."""
    keyed = []
    for li, (lang, pieces) in enumerate(ranked.items()):
        n = max(len(pieces), 1)
        keyed += [(r / n, li, r, p) for r, p in enumerate(pieces)]
    keyed.sort()
    seen: set[str] = set()
    out = []
    for _, _, _, p in keyed:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


# -- the stage ------------------------------------------------------------------------------------------------------


def run(params: dict[str, Any], layout: Layout) -> dict[str, Any]:
    cfg = config(params)
    seed = int(params.get("seed", 0))
    base = find_base(cfg, layout)
    langs = new_languages(cfg, layout)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    new_text = {lang: sample_lines(layout.clean, seed, cfg["max_train_chars"], role="train", domain="new", lang=lang)
                for lang in langs}
    for lang, lines in new_text.items():
        if not lines:
            raise DataError(f"{layout.clean}: no non-empty role: train text for language {lang}")
    old_text = sample_lines(layout.clean, seed, cfg["old_max_chars"], role="train", domain="old")
    if not old_text:
        raise DataError(f"{layout.clean}: no role: train, domain: old text to check the old language against")
    timings["read"] = time.perf_counter() - t0

    if base.kind == "spm":
        from cpt.tok.spm_family import extend_spm

        result = extend_spm(base, cfg, seed, new_text, old_text, layout, timings)
    else:
        from cpt.tok.bpe_extend import extend_bpe

        result = extend_bpe(base, cfg, seed, new_text, old_text, layout, timings)

    t = time.perf_counter()
    metrics, changed_examples = evaluate(result, cfg, langs, layout)
    timings["evaluate"] = time.perf_counter() - t
    metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    write_report(metrics, changed_examples, result, layout)
    problems = []
    if metrics["roundtrip_failures"] > metrics["roundtrip_failures_base"]:
        problems.append(f"{metrics['roundtrip_failures']} eval lines do not round-trip "
                        f"(the base: {metrics['roundtrip_failures_base']})")
    if metrics["hf_mismatch_lines"]:
        problems.append(f"{metrics['hf_mismatch_lines']} eval lines encode differently through AutoTokenizer")
    if problems and cfg["strict"]:
        raise DataError(f"{layout.tokenizer}: " + "; ".join(problems) + " (tokenizer.strict=false to keep it)")
    return metrics


def evaluate(result: Any, cfg: dict[str, Any], langs: list[str], layout: Layout) -> tuple[dict[str, Any], list[str]]:
    """Every number on role: eval text: fertility per language, old-language invariance, round trip, HF parity.
    Returns the metrics and the first changed old-language lines (for the report)."""
    limit = cfg["check_lines"]
    eval_langs: list[str] = []
    for s in select_sources(layout.clean, role="eval"):
        if s.lang not in eval_langs:
            eval_langs.append(s.lang)
    languages: dict[str, dict[str, float]] = {}
    rt_fail = rt_base = hf_fail = checked = 0
    for lang in progress(eval_langs, desc="tokenizer eval", unit="lang"):
        lines = eval_lines(layout.clean, lang, 0)
        if not lines:
            continue
        b = fert.fertility(lines, lang, result.encode_base)
        n = fert.fertility(lines, lang, result.encode)
        languages[lang] = {
            "lines": n.lines, "words": n.words,
            "tokens_per_word_base": round(b.tokens_per_word, 4), "tokens_per_word": round(n.tokens_per_word, 4),
            "chars_per_token_base": round(b.chars_per_token, 4), "chars_per_token": round(n.chars_per_token, 4),
        }
        sample = lines[:limit] if limit else lines
        rt_fail += len(fert.roundtrip_failures(sample, result.encode_hf, result.decode_hf))
        rt_base += len(fert.roundtrip_failures(sample, result.encode_base, result.decode_base))
        hf_fail += len(fert.changed_lines(sample, result.encode, result.encode_hf))
        checked += len(sample)
    old = [line for s in select_sources(layout.clean, role="eval", domain="old")
           for line in _lines(iter_docs(layout.clean, role="eval", domain="old", name=s.name))]
    changed = fert.changed_lines(old, result.encode_base, result.encode)
    return {
        "base_kind": result.kind,
        "base_vocab": result.base_vocab,
        "added": len(result.added),
        "vocab": result.base_vocab + len(result.added),
        "new_languages": ",".join(langs),  # a string: DVC metrics are scalars
        "candidates": result.candidates,
        "pruned_exact": result.pruned_exact,
        "pruned_guard": result.pruned_guard,
        "pruned_unreachable": result.pruned_unreachable,
        "old_language_lines": len(old),
        "old_language_changed_lines": len(changed),
        "roundtrip_lines": checked,
        "roundtrip_failures": rt_fail,
        "roundtrip_failures_base": rt_base,  # a lossy base normaliser (NFKC, whitespace collapse) fails some too
        "hf_mismatch_lines": hf_fail,
        "languages": languages,
    }, [old[i][:200] for i in changed[:5]]


def write_report(metrics: dict[str, Any], changed_examples: list[str], result: Any, layout: Layout) -> None:
    m = metrics
    base_file = Path(result.base_file)
    if base_file.is_relative_to(layout.root):  # a committed report names no machine's absolute path
        base_file = base_file.relative_to(layout.root)
    text = [
        "# Tokenizer extension: fertility and old-language invariance\n",
        f"Base: `{base_file}` ({result.kind}, {m['base_vocab']} tokens). Added {m['added']} pieces for "
        f"{m['new_languages'].replace(',', ', ')} -> vocab {m['vocab']} (train pads the embedding matrix).\n",
        f"Candidates {m['candidates']}: pruned {m['pruned_exact']} that fire on the old-language training text, "
        f"{m['pruned_guard']} by the held-out guard, {m['pruned_unreachable']} unreachable.\n",
        "## Fertility on role: eval text\n",
        fert.table(m["languages"]),
        "## Old language (role: eval, domain: old lines; held out from every choice)\n",
        f"- lines: {m['old_language_lines']}, changed: **{m['old_language_changed_lines']}**",
        f"- round trip decode(encode(x)) == x: {m['roundtrip_lines'] - m['roundtrip_failures']} of "
        f"{m['roundtrip_lines']} eval lines (base tokenizer: {m['roundtrip_lines'] - m['roundtrip_failures_base']})",
        f"- AutoTokenizer == merged model: {m['roundtrip_lines'] - m['hf_mismatch_lines']} of {m['roundtrip_lines']} "
        "eval lines",
    ]
    for ex in changed_examples:
        text.append(f"  - changed: `{ex}`")
    with atomic_open(layout.reports / "fertility.md") as fh:
        fh.write("\n".join(text) + "\n")
