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

import logging
import time
from typing import Any

from cpt.errors import ConfigError, DataError
from cpt.layout import Layout
from cpt.params import section, stage_config
from cpt.tok.hf_export import carry_chat_template
from cpt.tok.report import evaluate, write_report
from cpt.tok.sampling import find_base, heldout_ids, new_languages, sample_docs, sample_lines

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "base": "",
    "languages": [],
    "vocab_size": {"vi": 8000, "zh": 8000, "ja": 8000, "ko": 4000},  # other languages: DEFAULT_VOCAB
    "model_type": "bpe",
    "character_coverage": 0.9995,
    "max_train_chars": 5_000_000,
    "old_max_chars": 5_000_000,
    "guard": "lexicon",
    "lexicon_size": 100_000,
    "old_alphabet_min_freq": 1.0e-4,
    "foreign_ratio": 1.0,
    "max_added": 0,
    "check_lines": 2000,
    "num_threads": 2,
    "strict": True,
}
SHARDS_VAL_FRACTION = 0.05  # cpt.stages.shards.DEFAULTS["val_fraction"] (a stage does not import another; tested)
GUARDS = ("lexicon", "distinct", "native", "exact")


def config(params: dict[str, Any]) -> dict[str, Any]:
    cfg = stage_config(params, "tokenizer", DEFAULTS)
    if cfg["guard"] not in GUARDS:
        raise ConfigError(f"tokenizer.guard: {cfg['guard']!r}; expected one of {GUARDS}")
    if cfg["model_type"] not in ("bpe", "unigram"):
        raise ConfigError(f"tokenizer.model_type: {cfg['model_type']!r}; expected 'bpe' or 'unigram'")
    for key in ("max_train_chars", "old_max_chars", "check_lines", "num_threads", "max_added", "lexicon_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 0:
            raise ConfigError(f"tokenizer.{key}: {cfg[key]!r}; expected a non-negative integer")
    return cfg


# -- the base tokenizer -------------------------------------------------------------------------------------------


# -- text ---------------------------------------------------------------------------------------------------------


# -- the stage ------------------------------------------------------------------------------------------------------


def run(params: dict[str, Any], layout: Layout) -> dict[str, Any]:
    cfg = config(params)
    seed = int(params.get("seed", 0))
    base = find_base(cfg, layout)
    langs = new_languages(cfg, layout)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # the documents the shards stage holds out (shards.val_fraction, same seed, the same split: eval scores them as
    # heldout_<lang>) never reach new-piece training or the old-language chooser
    val_fraction = float(section(params, "shards").get("val_fraction", SHARDS_VAL_FRACTION))
    held = {d: heldout_ids(layout.clean, seed, val_fraction, d) for d in ("new", "old")}
    new_text = {lang: sample_lines(layout.clean, seed, cfg["max_train_chars"], exclude=held["new"], role="train",
                                   domain="new", lang=lang) for lang in langs}
    for lang, lines in new_text.items():
        if not lines:
            raise DataError(f"{layout.clean}: no non-empty role: train text for language {lang}")
    # the old-language chooser as whole documents, exactly as data/clean holds them (and the shards stage encodes
    # them); the line-level checks use their NFC lines
    # minus the held-out documents: held-out English that eval scores stays unseen by the choice, so the
    # old-language invariance measured on it is a held-out number
    old_docs = sample_docs(layout.clean, seed, cfg["old_max_chars"], exclude=held["old"], role="train", domain="old")
    if not old_docs:
        raise DataError(f"{layout.clean}: no role: train, domain: old text to check the old language against")
    timings["read"] = time.perf_counter() - t0

    if base.kind == "spm":
        from cpt.tok.spm_family import extend_spm

        result = extend_spm(base, cfg, seed, new_text, old_docs, layout, timings)
    else:
        from cpt.tok.bpe_extend import extend_bpe

        result = extend_bpe(base, cfg, seed, new_text, old_docs, layout, timings)
    chat_template = carry_chat_template(base.folder, layout.tokenizer)

    t = time.perf_counter()
    metrics, changed_examples = evaluate(result, cfg, langs, layout)
    timings["evaluate"] = time.perf_counter() - t
    metrics["held_out_docs_excluded"] = {d: len(ids) for d, ids in held.items()}
    metrics["chat_template"] = chat_template
    metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    write_report(metrics, changed_examples, result, layout)
    problems = []
    if metrics["roundtrip_failures"] > metrics["roundtrip_failures_base"]:
        problems.append(f"{metrics['roundtrip_failures']} eval lines do not round-trip "
                        f"(the base: {metrics['roundtrip_failures_base']})")
    if metrics["old_language_changed_lines"] or metrics["old_language_changed_docs"]:
        problems.append(f"{metrics['old_language_changed_lines']} of {metrics['old_language_lines']} held-out "
                        f"old-language lines and {metrics['old_language_changed_docs']} of "
                        f"{metrics['old_language_docs']} documents encode differently from the base, through new "
                        f"pieces {metrics['old_language_changed_pieces']}")
    if metrics["hf_mismatch_lines"]:
        problems.append(f"{metrics['hf_mismatch_lines']} eval lines encode differently through AutoTokenizer")
    if problems and cfg["strict"]:
        raise DataError(f"{layout.tokenizer}: " + "; ".join(problems) + " (tokenizer.strict=false to keep it)")
    return metrics


