"""Stage ``clean``: data/raw -> data/clean (normalised, filtered, deduplicated, decontaminated).

A datatrove-style chain of small steps, each in its own module, run in this order:

1. ``textnorm.normalize`` on every document (NFC, controls, whitespace, MediaWiki sections) — train and eval.
2. ``filters.check`` per language on training documents (length, digits, symbols, repeated lines, script).
   Eval documents are never quality-filtered (NTREX lines are single short sentences); only an eval text that is
   empty after normalisation is dropped, and counted.
3. Exact dedup of training documents on the normalised-text hash (first in input order kept).
4. Decontamination of training documents against every ``role: eval`` document (long n-grams, ``decontam``).
   It runs before near-dedup so that a cluster's kept document is never one that is then thrown out.
5. Near dedup of training documents with MinHash LSH (``dedup``), one kept per cluster (first in input order).
   Dedup spans all training sources (cross-source duplicates count); eval sources are not deduplicated.

Nothing is dropped silently: every dropped document goes to ``data/clean/quarantine.jsonl`` as
``{id, source, reason, detail, ref}`` (``ref``: the kept duplicate or the eval document it overlaps) and every
reason is counted in ``metrics/clean.json``, overall and per source.
"""

from __future__ import annotations

from typing import Any

from cpt.data import engine, filters, textnorm
from cpt.data.cleaning import clean_corpus
from cpt.errors import ConfigError
from cpt.layout import Layout
from cpt.params import section, stage_config, with_defaults

DEFAULTS: dict[str, Any] = {
    "wiki_markup": True,
    "drop_sections": list(textnorm.DEFAULT_DROP_SECTIONS),
    "filters": {},
    "dedup": {
        "exact": True,
        "near": True,
        "threshold": 0.8,
        "lsh_threshold": 0.6,
        "num_perm": 128,
        "bands": None,
        "rows": None,
        "word_ngram": 5,
        "char_ngram": 5,
    },
    "decontam": {"enabled": True, "word_ngram": 13, "char_ngram": 25},
}


def _config(params: dict[str, Any]) -> dict[str, Any]:
    sec = section(params, "clean")
    cfg = stage_config(params, "clean", DEFAULTS)
    for sub in ("dedup", "decontam"):
        cfg[sub] = with_defaults(f"clean.{sub}", sec.get(sub), DEFAULTS[sub])
    for lang, th in (cfg["filters"] or {}).items():
        if th is None:
            continue  # `vi:` with nothing under it: the defaults
        if not isinstance(th, dict):
            raise ConfigError(f"clean.filters.{lang}: expected a mapping of thresholds")
        bad = set(th) - filters.FILTER_KEYS
        if bad:
            raise ConfigError(f"clean.filters.{lang}: unknown thresholds {sorted(bad)}; allowed: {sorted(filters.FILTER_KEYS)}")
    thr = cfg["dedup"]["threshold"]
    if not 0.0 < float(thr) <= 1.0:
        raise ConfigError(f"clean.dedup.threshold must be in (0, 1], got {thr!r}")
    return cfg




def run(params: dict[str, Any], layout: Layout) -> dict[str, Any]:
    return clean_corpus(_config(params), int(params.get("seed", 0)), layout, engine.config(params))
