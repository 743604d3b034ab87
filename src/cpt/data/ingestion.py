"""Ingesting one source (``cpt.stages.ingest``): its readers' records -> document records in shards, with every
rejected record kept with its reason. A module-level task, so the engine can run sources side by side.

Ids are ``<source>/<own id>`` or ``<source>/<n>`` (n-th valid record); a duplicate id is a reject. ``max_docs`` with
``sample: first`` keeps the first N valid records; ``sample: uniform`` keeps the N with the smallest seeded hash of
their id (one pass, a heap of N), written back in file order.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from typing import Any, Iterator

from cpt.data.shardio import ShardedWriter
from cpt.data.sources import Reject, Source, iter_source
from cpt.errors import DataError
from cpt.progress import progress


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


