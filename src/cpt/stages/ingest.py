"""Stage ``ingest``: read the configured sources into ``data/raw/<source>/part-NNNNN.jsonl.zst`` shards (records).

Every source is checked before any work (a missing file, an unknown format or a bad key is a ConfigError/DataError
naming the source), so a typo in params.yaml fails in a second instead of after minutes of reading. Then each
source is streamed record by record; bad input never crashes the stage and is never lost silently: invalid UTF-8,
a line that is not JSON, a record without its text field, an empty text, a duplicate id, a truncated gzip member go
to ``data/raw/rejects.jsonl`` as ``{source, file, line, reason, detail}`` and are counted in ``metrics/ingest.json``.

Formats: ``.jsonl`` / ``.jsonl.gz`` / ``.json.gz`` (one JSON object per line), ``.parquet``, ``.txt`` (``unit`` says
what a document is: ``line`` one per line (NTREX), ``wikitext`` one per `` = Title = `` article (WikiText),
``blank`` blank-line-separated paragraphs, ``file`` the whole file), ``.json`` in the SQuAD v1.1 layout (XQuAD,
MLQA...: one document per distinct paragraph ``context``, so QA sets can be eval sources and reach decontamination),
and ``hf`` (a Hugging Face dataset, streamed).
``max_docs`` caps a source: ``sample: first`` keeps the first N valid documents, ``sample: uniform`` a seeded,
order-preserving uniform sample of N (one pass, bounded memory), so a cap on a title-sorted dump such as viwiki
does not keep only the articles whose titles start with a digit.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import shutil
from collections import Counter
from typing import Any, Iterator

from cpt.data import engine
from cpt.data.engine import Engine
from cpt.data.records import ROLES, SourceInfo, write_manifest
from cpt.data.shardio import ShardedWriter
from cpt.data.sources import DEFAULT_CORPUS_DIR, Reject, Source, iter_source, parse_sources
from cpt.errors import DataError
from cpt.io import replace_dir, write_jsonl
from cpt.layout import Layout
from cpt.params import section
from cpt.progress import progress

log = logging.getLogger("cpt.stages.ingest")

DEFAULTS: dict[str, Any] = {
    "corpus_dir": DEFAULT_CORPUS_DIR,
    "sources": [],
    "shard_mb": 32,  # uncompressed JSONL per shard: the unit of work of clean and validate (cpt.data.shardio)
}


# ---------------------------------------------------------------- readers: yield (line, own_id, text) or Reject


# ---------------------------------------------------------------- the stage


def _sample_key(seed: int, doc_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()


def ingest_task(src: Source, out_dir: str, seed: int, shard_bytes: int) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """One source as an engine task: (stats, rejects, shards)."""
    rejects: list[dict[str, Any]] = []
    writer = ShardedWriter(out_dir, shard_bytes)
    stats = ingest_source(src, writer, seed, rejects)
    return stats, rejects, writer.shards


def ingest_source(src: Source, writer: ShardedWriter, seed: int, rejects: list[dict[str, Any]]) -> dict[str, Any]:
    """Stream one source into its shards; rejected records are appended to ``rejects``."""
    reasons: Counter[str] = Counter()
    seen_ids: set[str] = set()
    kept: list[tuple[bytes, int, dict]] = []  # uniform sampling: a heap of (-key, order, record), bounded by max_docs
    n_valid = 0

    def reject(r: Reject) -> None:
        reasons[r.reason] += 1
        rejects.append({"source": src.name, "file": r.file, "line": r.line, "reason": r.reason, "detail": r.detail})

    def records() -> Iterator[dict[str, Any]]:
        nonlocal n_valid
        for item in progress(iter_source(src), desc=f"ingest {src.name}", unit=" docs"):
            if isinstance(item, Reject):
                reject(item)
                continue
            file, line, own, text = item
            if not text.strip():
                reject(Reject(file, line, "empty text", ""))
                continue
            doc_id = f"{src.name}/{own if own is not None else n_valid}"
            if doc_id in seen_ids:
                reject(Reject(file, line, "duplicate id", doc_id))
                continue
            seen_ids.add(doc_id)
            n_valid += 1
            yield {"id": doc_id, "source": src.name, "lang": src.lang, "domain": src.domain, "role": src.role,
                   "text": text}
            if src.sample == "first" and src.max_docs is not None and n_valid >= src.max_docs:
                return

    if src.sample == "uniform" and src.max_docs is not None:
        # Keep the max_docs records with the smallest seeded hash of their id (a uniform sample that does not
        # depend on file order), then write them back in file order so the output reads like the input.
        for order, rec in enumerate(records()):
            key = _sample_key(seed, rec["id"])
            item = (bytes(255 - b for b in key), order, rec)  # max-heap on key via inverted bytes
            if len(kept) < src.max_docs:
                heapq.heappush(kept, item)
            elif item > kept[0]:
                heapq.heapreplace(kept, item)
        rows: Any = (rec for _, _, rec in sorted(kept, key=lambda t: t[1]))
    else:
        rows = records()

    n_docs = 0
    n_bytes = 0
    for rec in rows:
        writer.write(rec)
        n_docs += 1
        n_bytes += len(rec["text"].encode("utf-8"))
    writer.close()
    if n_docs == 0:
        raise DataError(f"ingest source {src.name!r}: no valid documents ({dict(reasons) or 'empty input'})")
    return {"docs": n_docs, "bytes": n_bytes, "candidates": n_valid, "rejected": dict(sorted(reasons.items())),
            "lang": src.lang, "domain": src.domain, "role": src.role, "format": src.fmt}


def run(params: dict[str, Any], layout: Layout) -> dict[str, Any]:
    cfg = {**DEFAULTS, **section(params, "ingest")}
    seed = int(params.get("seed", 0))
    sources = parse_sources(cfg, layout)  # every check before any work

    shard_bytes = int(float(cfg["shard_mb"]) * 1024 * 1024)
    # Built in a sibling folder and swapped in whole: a killed run never leaves a half-written data/raw.
    tmp = layout.raw.with_name(f".{layout.raw.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    rejects: list[dict[str, Any]] = []
    infos: list[SourceInfo] = []
    by_source: dict[str, Any] = {}
    with Engine(engine.config(params)) as eng:  # one task per source, results in source order
        results = eng.map(ingest_task, [(src, str(tmp / src.name), seed, shard_bytes) for src in sources],
                          name="ingest")
    for src, (stats, src_rejects, shards) in zip(sources, results):
        by_source[src.name] = stats
        rejects.extend(src_rejects)
        infos.append(SourceInfo(src.name, src.lang, src.domain, src.role, src.name, stats["docs"], tuple(shards)))
        log.info("%s: %d docs, %.1f MB in %d shards, %d rejected", src.name, stats["docs"], stats["bytes"] / 1e6,
                 len(shards), sum(stats["rejected"].values()))
    write_jsonl(tmp / "rejects.jsonl", rejects)
    write_manifest(tmp, infos)
    replace_dir(tmp, layout.raw)

    reasons: Counter[str] = Counter()
    for s in by_source.values():
        reasons.update(s["rejected"])
    return {
        "sources": len(infos),
        "docs": sum(s["docs"] for s in by_source.values()),
        "bytes": sum(s["bytes"] for s in by_source.values()),
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "engine": eng.summary(),
        "docs_by_role": {r: sum(s["docs"] for s in by_source.values() if s["role"] == r) for r in ROLES},
        "by_source": by_source,
    }
