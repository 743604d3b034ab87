"""A model's per-unit scores on an eval set, each source with a content hash: what the registry keeps with a version.

The gate compares a candidate with the current champion unit by unit (a paired bootstrap over documents,
``cpt.evaluation.uncertainty.compare``), so it needs both models' NLL on the SAME units under the SAME scoring
rules. A stored record is reused only when every source's ``hash`` matches: a sha256 over the scoring
configuration (``eval.max_length``, ``stride``, ``batch_size``, ``unit_bytes``, the resolved device type and
autocast dtype, and ``SCORER``, the version of the scoring rules) and over every unit's text and document label, in
order. Byte counts decide nothing: the same number of bytes of other text, or the same text under another window,
is another measurement, and the champion is re-scored.

Record shape (``data/eval/sources.json``; the registered version's artifact ``gate/sources.json``)::

    {source: {"domain", "lang", "bytes", "bpb", "hash", "documents",
              "units": {"doc": [label, ...], "bytes": [int, ...], "nll": [nats, ...]}}}

Records written before the hash existed (``{source: {"domain", "bytes", "bpb"}}``) never match: re-scored.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

# The scoring rules' version: bump when what a unit's NLL means changes (windows, prefix token, bytes counted), so
# every stored record goes stale and champions are re-scored.
SCORER = 2


def path(layout: Any) -> Path:
    """data/eval/sources.json: the candidate's record (a DVC output of eval, not in git)."""
    return Path(layout.data) / "eval" / "sources.json"


def base_path(layout: Any) -> Path:
    """data/eval/base.json: the base model's record on the same units (what ``cpt merge`` pairs its points with,
    so the base is never re-scored)."""
    return Path(layout.data) / "eval" / "base.json"


def scoring_config(cfg: dict[str, Any], device: str, dtype: str | None) -> dict[str, Any]:
    """What, besides the text, decides a unit's NLL: the eval knobs and the resolved device type / autocast dtype
    (``dtype`` None = fp32)."""
    return {"scorer": SCORER, "max_length": cfg["max_length"], "stride": cfg["stride"],
            "batch_size": cfg["batch_size"], "unit_bytes": cfg.get("unit_bytes"), "device": device,
            "dtype": dtype or "fp32"}


def unit_hash(config: dict[str, Any], texts: Iterable[str], docs: Iterable[Any]) -> str:
    """sha256 of the scoring configuration and of every unit (document label + text), in order."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8"))
    for doc, text in zip(docs, texts, strict=True):
        h.update(b"\x00")
        h.update(json.dumps(doc).encode("utf-8"))
        h.update(b"\x01")
        h.update(text.encode("utf-8"))
    return h.hexdigest()


def entry(name: str, lang: str, domain: str, texts: Sequence[str], docs: Sequence[Any], nll: Sequence[float],
          nbytes: Sequence[int], config: dict[str, Any]) -> dict[str, Any]:
    """One source's record: its units' NLL, bytes and documents, the pooled bpb and the content hash."""
    if not len(texts) == len(docs) == len(nll) == len(nbytes):
        raise ValueError(f"{name}: {len(texts)} units, {len(docs)} documents, {len(nll)} scores, {len(nbytes)} sizes")
    total = int(sum(nbytes))
    return {"domain": domain, "lang": lang, "bytes": total,
            "bpb": float(sum(nll)) / (math.log(2.0) * total) if total else None,
            "hash": unit_hash(config, texts, docs), "documents": len(set(map(json.dumps, docs))),
            "units": {"doc": list(docs), "bytes": [int(b) for b in nbytes], "nll": [float(x) for x in nll]}}


def of_scores(sources: Sequence[Any], scores: dict[str, Any], config: dict[str, Any]) -> dict[str, dict]:
    """The record of one model's ``Score`` per ``EvalSource`` (``cpt.evaluation``), units in the sources' order."""
    return {s.name: entry(s.name, s.lang, s.domain, s.texts, s.docs, scores[s.name].doc_nll,
                          scores[s.name].doc_bytes, config) for s in sources}


def is_record(obj: Any) -> bool:
    """True for a record with per-unit scores and hashes (not the older per-source-bpb shape)."""
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, dict) and v.get("hash") and isinstance(v.get("units"), dict) for v in obj.values())


def matches(candidate: dict[str, Any], other: dict[str, Any] | None) -> tuple[bool, str]:
    """(True, "") when ``other`` holds every source of ``candidate`` on the same units under the same scoring
    configuration (equal hashes, per-unit scores present); else (False, the first reason)."""
    other = other or {}
    for name, mine in sorted(candidate.items()):
        theirs = other.get(name)
        if not isinstance(theirs, dict):
            return False, f"no scores for source {name}"
        if not theirs.get("hash"):
            return False, f"{name}: stored without a content hash (an older record)"
        if theirs["hash"] != mine.get("hash"):
            return False, f"{name}: other units or another eval configuration (content hash differs)"
        units = theirs.get("units") or {}
        if len(units.get("nll") or ()) != len(mine["units"]["nll"]):
            return False, f"{name}: per-unit scores missing or of another length"
        if theirs.get("domain") != mine.get("domain"):
            return False, f"{name}: domain {theirs.get('domain')!r} != {mine.get('domain')!r}"
    return bool(candidate), "" if candidate else "the candidate has no per-unit scores"
