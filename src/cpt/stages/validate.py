"""Stage ``validate``: a Great Expectations 1.x gate over data/clean; a broken expectation stops ``dvc repro``.

Two batches, two suites:

* ``clean_docs`` — one row per cleaned document (id, source, lang, role, n_chars, text_hash, is_nfc, script_ratio):
  text not null / not empty, ids unique, roles and domains known, NFC, per-language length bounds and script
  ratio for training documents (the bounds of ``clean.filters``, so the gate checks that clean did its job), unique
  text hash among training documents, and **no eval document in training** (no training text hash equal to an
  eval text hash).
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

from cpt.data.checks import doc_expectations, doc_frames, run_suite, source_expectations, validation_markdown
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
}


def run(params: dict[str, Any], layout: Layout) -> dict[str, Any]:
    cfg = stage_config(params, "validate", DEFAULTS)
    docs, per_source = doc_frames(layout)

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
    results = run_suite(ctx, "clean_docs", docs, doc_expectations(docs, params), "id")
    results += run_suite(ctx, "clean_sources", per_source, source_expectations(per_source, cfg), "source")

    failed = [r for r in results if not r["success"]]
    metrics: dict[str, Any] = {
        "success": not failed,
        "docs": int(len(docs)),
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
    log.info("%d expectations passed on %d documents; Data Docs at %s", len(results), len(docs), site / "index.html")
    return metrics
