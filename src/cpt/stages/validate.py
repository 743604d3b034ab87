"""Stage ``validate``: a Great Expectations 1.x gate over data/clean; a broken expectation stops ``dvc repro``.

Two batches, two suites:

* ``clean_docs`` — one row per cleaned document, of statistics only, never the text (``cpt.data.checks``): every
  clean shard is read by an engine task that writes its rows (id, source, lang, role, n_chars, is_nfc,
  script_ratio, 128-bit text and id hashes) to a parquet file; the corpus-wide checks sort the hash columns (34 bytes
  per document) into three flags, and the frame is validated in chunks of ``validate.chunk_docs`` rows, so memory
  does not grow with the corpus. Expectations: text not null / not empty, ids unique, roles and domains known, NFC,
  per-language length bounds and script ratio for training documents (the bounds of ``clean.filters``, so the gate
  checks that clean did its job), unique text hash among training documents, and **no eval document in training**
  (no training text hash equal to an eval text hash).
* ``clean_sources`` — one row per source: documents within ``validate.row_counts`` bounds (default: at least
  ``validate.min_docs``), and the fraction of raw documents kept at least ``validate.min_keep_ratio`` (train) /
  ``validate.min_eval_keep_ratio`` (eval), which catches a filter gone wrong.

Data Docs HTML goes to ``reports/data_docs/`` (index.html). ``metrics/validate.json`` has ``success`` and one entry per
expectation with its result; on failure ``ValidationFailed`` names each failing expectation with example ids.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from cpt.data import engine
from cpt.data.checks import (
    corpus_flags,
    doc_chunks,
    doc_expectations,
    make_checkpoint,
    merge_results,
    run_checkpoint,
    shard_stats,
    source_expectations,
    source_frame,
    validation_markdown,
)
from cpt.data.engine import Engine
from cpt.errors import ValidationFailed
from cpt.io import atomic_open
from cpt.layout import Layout
from cpt.params import stage_config

log = logging.getLogger("cpt.stages.validate")

DEFAULTS: dict[str, Any] = {
    "min_docs": 1,
    "row_counts": {},
    "min_keep_ratio": 0.5,
    "min_eval_keep_ratio": 0.99,
    "examples": 5,
    "chunk_docs": 1_000_000,
}


def run(params: dict[str, Any], layout: Layout) -> dict[str, Any]:
    cfg = stage_config(params, "validate", DEFAULTS)
    sources, per_source = source_frame(layout)
    work = layout.clean.with_name(f".{layout.clean.name}.validate")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tasks = [(str(path), s.name, s.lang, str(work / f"{i:06d}.parquet"))
             for i, (s, path) in enumerate((s, p) for s in sources for p in s.paths(layout.clean))]
    with Engine(engine.config(params)) as eng:
        counts = eng.map(shard_stats, tasks, name="validate: shard statistics",
                         cost=[os.path.getsize(t[0]) for t in tasks])
    files = [t[3] for t in tasks]
    flags = corpus_flags(files)

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    site = layout.reports / "data_docs"
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    ctx = gx.get_context(mode="ephemeral")
    try:
        ctx.variables.progress_bars = {"globally": False, "metric_calculations": False}
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    ctx.add_data_docs_site(site_name="cpt", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    train_langs = sorted({s.lang for s in sources if s.role == "train"})
    docs_cp = make_checkpoint(ctx, "clean_docs", doc_expectations(train_langs, params), "id")
    results = merge_results([run_checkpoint(docs_cp, "clean_docs", frame, "id")
                             for frame in doc_chunks(files, flags, int(cfg["chunk_docs"]))])
    src_cp = make_checkpoint(ctx, "clean_sources", source_expectations(per_source, cfg), "source")
    results += run_checkpoint(src_cp, "clean_sources", per_source, "source")
    shutil.rmtree(work, ignore_errors=True)
    n_docs = int(sum(counts))

    failed = [r for r in results if not r["success"]]
    metrics: dict[str, Any] = {
        "success": not failed,
        "docs": n_docs,
        "engine": eng.summary(),
        "sources": int(len(per_source)),
        "evaluated": len(results),
        "failed": len(failed),
        "data_docs": str((site / "index.html").relative_to(layout.root)) if site.is_relative_to(layout.root)
        else str(site / "index.html"),
        "expectations": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in results},
    }
    with atomic_open(layout.reports / "validation.md") as fh:  # readable offline, and in git
        fh.write(validation_markdown(metrics))
    if failed:
        lines = [
            f"{r['name']} ({r['expectation']} on {r['column']}"
            + (f" where {r['row_condition']}" if r["row_condition"] else "")
            + f"): {r['unexpected_count']} of {r['element_count']} unexpected, e.g. {r['examples'][:cfg['examples']]}"
            for r in failed
        ]
        raise ValidationFailed(
            f"{len(failed)} of {len(results)} expectations failed on {layout.clean} (Data Docs: {site}/index.html):\n  "
            + "\n  ".join(lines)
        )
    log.info("%d expectations passed on %d documents; Data Docs at %s", len(results), n_docs, site / "index.html")
    return metrics
