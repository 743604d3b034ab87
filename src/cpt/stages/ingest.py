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

import logging
import shutil
from collections import Counter
from typing import Any

from cpt.data import engine
from cpt.data.engine import Engine
from cpt.data.ingestion import ingest_task
from cpt.data.records import ROLES, SourceInfo, write_manifest
from cpt.data.sources import DEFAULT_CORPUS_DIR, parse_sources
from cpt.io import replace_dir, write_jsonl
from cpt.layout import Layout
from cpt.params import section

log = logging.getLogger("cpt.stages.ingest")

DEFAULTS: dict[str, Any] = {
    "corpus_dir": DEFAULT_CORPUS_DIR,
    "sources": [],
    "shard_mb": 32,  # uncompressed JSONL per shard: the unit of work of clean and validate (cpt.data.shardio)
}


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
