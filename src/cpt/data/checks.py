"""The checks ``validate`` runs: per-document and per-source frames built from data/raw and data/clean, the
expectations over them, and running one great-expectations suite (imported lazily; it costs ~4 s)."""

from __future__ import annotations

from typing import Any

from cpt.data import filters
from cpt.data.records import DOMAINS, ROLES, read_manifest
from cpt.data.textnorm import nfc, text_hash
from cpt.errors import DataError
from cpt.io import read_jsonl
from cpt.layout import Layout
from cpt.params import section


def doc_frames(layout: Layout) -> tuple[Any, Any]:
    import pandas as pd

    try:
        sources = read_manifest(layout.clean)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    raw = {s.name: s.docs for s in read_manifest(layout.raw)} if (layout.raw / "manifest.json").exists() else {}
    rows: list[dict[str, Any]] = []
    for s in sources:
        scripts = filters.LANG_SCRIPTS.get(s.lang)
        for doc in read_jsonl(layout.clean / s.file):
            text = doc.get("text")
            ok = isinstance(text, str)
            rows.append({
                "id": doc.get("id"), "source": s.name, "lang": doc.get("lang"), "domain": doc.get("domain"),
                "role": doc.get("role"), "text": text if ok else None,
                "n_chars": len(text) if ok else 0,
                "text_hash": text_hash(text) if ok else None,
                "is_nfc": ok and nfc(text) == text,
                "script_ratio": (filters.doc_stats(text).ratio(scripts) if ok and scripts else 1.0),
            })
    docs = pd.DataFrame(rows, columns=["id", "source", "lang", "domain", "role", "text", "n_chars", "text_hash",
                                       "is_nfc", "script_ratio"])
    per_source = pd.DataFrame([
        {"source": s.name, "role": s.role, "lang": s.lang, "clean_docs": s.docs,
         "raw_docs": raw.get(s.name, s.docs),
         "keep_ratio": s.docs / raw[s.name] if raw.get(s.name) else 1.0}
        for s in sources
    ])
    return docs, per_source


def doc_expectations(docs: Any, params: dict[str, Any]) -> list[tuple[str, Any]]:
    import great_expectations.expectations as gxe

    pandas = {"condition_parser": "pandas"}
    ex: list[tuple[str, Any]] = [
        ("text_not_null", gxe.ExpectColumnValuesToNotBeNull(column="text")),
        ("text_not_empty", gxe.ExpectColumnValuesToBeBetween(column="n_chars", min_value=1)),
        ("id_unique", gxe.ExpectColumnValuesToBeUnique(column="id")),
        ("role_known", gxe.ExpectColumnValuesToBeInSet(column="role", value_set=list(ROLES))),
        ("domain_known", gxe.ExpectColumnValuesToBeInSet(column="domain", value_set=list(DOMAINS))),
        ("text_is_nfc", gxe.ExpectColumnValuesToBeInSet(column="is_nfc", value_set=[True])),
        ("train_text_hash_unique",
         gxe.ExpectColumnValuesToBeUnique(column="text_hash", row_condition='role=="train"', **pandas)),
    ]
    eval_hashes = sorted(set(docs.loc[docs["role"] == "eval", "text_hash"].dropna()))
    ex.append(("no_eval_text_in_train", gxe.ExpectColumnValuesToNotBeInSet(
        column="text_hash", value_set=eval_hashes or ["-"], row_condition='role=="train"', **pandas)))
    clean_filters = (section(params, "clean").get("filters") or {})
    for lang in sorted(set(docs.loc[docs["role"] == "train", "lang"].dropna())):
        th = filters.thresholds(clean_filters, lang)
        cond = f'role=="train" & lang=="{lang}"'
        ex.append((f"train_{lang}_length", gxe.ExpectColumnValuesToBeBetween(
            column="n_chars", min_value=th.get("min_chars", 1), max_value=th.get("max_chars"), row_condition=cond,
            **pandas)))
        if lang in filters.LANG_SCRIPTS and "min_script_ratio" in th:
            ex.append((f"train_{lang}_script_ratio", gxe.ExpectColumnValuesToBeBetween(
                column="script_ratio", min_value=th["min_script_ratio"], row_condition=cond, **pandas)))
    return ex


def source_expectations(per_source: Any, cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    import great_expectations.expectations as gxe

    pandas = {"condition_parser": "pandas"}
    ex: list[tuple[str, Any]] = []
    row_counts = cfg.get("row_counts") or {}
    for name in per_source["source"]:
        lo, hi = row_counts.get(name, [cfg["min_docs"], None])
        ex.append((f"rows_{name}", gxe.ExpectColumnValuesToBeBetween(
            column="clean_docs", min_value=lo, max_value=hi, row_condition=f'source=="{name}"', **pandas)))
    ex.append(("train_keep_ratio", gxe.ExpectColumnValuesToBeBetween(
        column="keep_ratio", min_value=cfg["min_keep_ratio"], row_condition='role=="train"', **pandas)))
    ex.append(("eval_keep_ratio", gxe.ExpectColumnValuesToBeBetween(
        column="keep_ratio", min_value=cfg["min_eval_keep_ratio"], row_condition='role=="eval"', **pandas)))
    return ex


def run_suite(ctx: Any, name: str, frame: Any, expectations: list[tuple[str, Any]], index_col: str) -> list[dict]:
    import great_expectations as gx

    asset = ctx.data_sources.add_pandas(f"{name}_source").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=name))
    for ex_name, ex in expectations:
        ex.meta = {"name": ex_name}
        suite.add_expectation(ex)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite))
    cp = ctx.checkpoints.add(gx.Checkpoint(
        name=f"{name}_checkpoint", validation_definitions=[vd],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["cpt"])],
        result_format={"result_format": "SUMMARY", "unexpected_index_column_names": [index_col]},
    ))
    result = cp.run(batch_parameters={"dataframe": frame})
    out = []
    for vr in result.run_results.values():
        for r in vr.results:
            conf = r.expectation_config
            res = r.result or {}
            idx = res.get("partial_unexpected_index_list") or []
            examples = [row.get(index_col) if isinstance(row, dict) else row for row in idx]
            if not examples:
                examples = list(res.get("partial_unexpected_list") or [])
            out.append({
                "name": (conf.meta or {}).get("name", conf.type), "suite": name, "expectation": conf.type,
                "column": conf.kwargs.get("column"), "row_condition": conf.kwargs.get("row_condition"),
                "success": bool(r.success), "element_count": res.get("element_count"),
                "unexpected_count": res.get("unexpected_count"),
                "examples": [str(e)[:120] for e in examples], "bounds": _bounds(conf.kwargs),
            })
    return out


def _bounds(kwargs: dict) -> str:
    """What the expectation allows, short: ``[100, 20000000]``, ``in {eval, train}``, ``not in (3,120 values)``."""
    if "min_value" in kwargs or "max_value" in kwargs:
        return f"[{kwargs.get('min_value')}, {kwargs.get('max_value')}]"
    values = kwargs.get("value_set")
    if values is not None:
        values = sorted(str(v) for v in values)
        return "{" + ", ".join(values) + "}" if len(values) <= 8 else f"({len(values):,} values)"
    return ""


def validation_markdown(metrics: dict) -> str:
    """reports/validation.md: every expectation the gate ran, its bounds and its result, in one self-contained page
    (Great Expectations' Data Docs need CDN assets; offline they render unstyled, with empty tables)."""
    ok = metrics["success"]
    L = ["# Data validation (great-expectations)", "",
         f"**{'PASSED' if ok else 'FAILED'}**: {metrics['evaluated'] - metrics['failed']} of {metrics['evaluated']} "
         f"expectations hold on {metrics['docs']:,} cleaned documents from {metrics['sources']} sources.", "",
         "| expectation | check | column | where | allowed | unexpected | result |", "|---|---|---|---|---|---:|---|"]
    for name, r in metrics["expectations"].items():
        cond = r.get("row_condition")
        where = cond.get("pass_through_filter", "") if isinstance(cond, dict) else (cond or "")
        check = r["expectation"].removeprefix("expect_column_values_to_").replace("_", " ")
        result = "ok" if r["success"] else "**FAILED**, e.g. " + ", ".join(f"`{e}`" for e in r["examples"][:3])
        L.append(f"| {name} | {check} | {r['column']} | {where} | {r.get('bounds', '')} | "
                 f"{r['unexpected_count'] or 0} of {r['element_count'] or 0:,} | {result} |")
    return "\n".join(L + [""])
