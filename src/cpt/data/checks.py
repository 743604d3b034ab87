"""The checks ``validate`` runs, built to scale: per-shard statistics (a task per clean shard, texts never leave
it), corpus-wide flags from the hash columns, the expectations over the statistics frame, and running a
great-expectations suite (imported lazily; it costs ~4 s) chunk by chunk with the results merged."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from cpt.data import filters
from cpt.data.records import DOMAINS, ROLES, read_manifest
from cpt.data.shardio import read_records
from cpt.data.textnorm import nfc, text_hash
from cpt.errors import DataError
from cpt.layout import Layout
from cpt.params import section


STATS_COLUMNS = ["id", "source", "lang", "domain", "role", "text_ok", "n_chars", "is_nfc", "script_ratio"]


def _h128(data: bytes) -> tuple[int, int]:
    h = bytes.fromhex(text_hash(data)) if isinstance(data, str) else hashlib.blake2b(data, digest_size=16).digest()
    return int.from_bytes(h[:8], "big"), int.from_bytes(h[8:], "big")


def shard_stats(path: str, source: str, lang: str, out: str) -> int:
    """One clean shard -> one row per document of statistics, never the text (a parquet file at ``out``).

    The text hash is ``textnorm.text_hash`` (the key clean deduplicated on) and the id hash a blake2b of the id,
    both as two 64-bit columns, so the corpus-wide checks (unique ids, unique training texts, no eval text in
    training) sort numbers instead of holding strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scripts = filters.LANG_SCRIPTS.get(lang)
    cols: dict[str, list[Any]] = {c: [] for c in STATS_COLUMNS + ["h_hi", "h_lo", "id_hi", "id_lo"]}
    for doc in read_records(path):
        text = doc.get("text")
        ok = isinstance(text, str)
        th = _h128(text) if ok else (0, 0)
        ih = _h128(str(doc.get("id")).encode("utf-8"))
        for k, v in (("id", doc.get("id")), ("source", source), ("lang", doc.get("lang")),
                     ("domain", doc.get("domain")), ("role", doc.get("role")), ("text_ok", ok),
                     ("n_chars", len(text) if ok else 0), ("is_nfc", ok and nfc(text) == text),
                     ("script_ratio", filters.doc_stats(text).ratio(scripts) if ok and scripts else 1.0),
                     ("h_hi", th[0]), ("h_lo", th[1]), ("id_hi", ih[0]), ("id_lo", ih[1])):
            cols[k].append(v)
    types = {"h_hi": pa.uint64(), "h_lo": pa.uint64(), "id_hi": pa.uint64(), "id_lo": pa.uint64(),
             "n_chars": pa.int64(), "script_ratio": pa.float64(), "text_ok": pa.bool_(), "is_nfc": pa.bool_()}
    table = pa.table({k: pa.array(v, type=types.get(k, pa.string()) if k != "id" else None) for k, v in cols.items()})
    pq.write_table(table, out)
    return table.num_rows


def _repeated(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """True for every row whose (hi, lo) pair occurs more than once (all members of a group, as GX's unique)."""
    if not len(hi):
        return np.zeros(0, dtype=bool)
    order = np.lexsort((lo, hi))
    sh, sl = hi[order], lo[order]
    same = (sh[1:] == sh[:-1]) & (sl[1:] == sl[:-1])
    rep = np.zeros(len(hi), dtype=bool)
    rep[order[1:][same]] = True
    rep[order[:-1][same]] = True
    return rep


def corpus_flags(files: list[str]) -> dict[str, np.ndarray]:
    """The cross-shard checks, from the hash columns only (34 bytes per document): ``id_repeated`` (an id seen
    twice anywhere), ``train_text_repeated`` (two training documents with one text), ``eval_text_in_train``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts: dict[str, list[np.ndarray]] = {c: [] for c in ("train", "eval", "h_hi", "h_lo", "id_hi", "id_lo")}
    for f in files:  # numbers only: the role strings become two boolean columns as each file is read
        x = pq.read_table(f, columns=["role", "text_ok", "h_hi", "h_lo", "id_hi", "id_lo"])
        ok = x["text_ok"].to_numpy(zero_copy_only=False).astype(bool)
        for role in ("train", "eval"):
            parts[role].append(pc.equal(x["role"], role).fill_null(False).to_numpy(zero_copy_only=False) & ok)
        for c in ("h_hi", "h_lo", "id_hi", "id_lo"):
            parts[c].append(x[c].to_numpy().astype(np.uint64))
    col = {c: np.concatenate(v) if v else np.zeros(0, np.uint64) for c, v in parts.items()}
    train, evals = col["train"].astype(bool), col["eval"].astype(bool)
    id_rep = _repeated(col["id_hi"].astype(np.uint64), col["id_lo"].astype(np.uint64))
    text_rep = np.zeros(len(train), dtype=bool)
    ti = np.flatnonzero(train)
    text_rep[ti] = _repeated(col["h_hi"][ti].astype(np.uint64), col["h_lo"][ti].astype(np.uint64))
    in_eval = np.zeros(len(train), dtype=bool)
    if len(ti) and evals.any():
        ek = np.unique(np.stack([col["h_hi"][evals], col["h_lo"][evals]], axis=1).astype(np.uint64), axis=0)
        sel = ti[np.isin(col["h_hi"][ti].astype(np.uint64), ek[:, 0])]  # 64-bit prefilter, then all 128 bits
        pairs = {(int(a), int(b)) for a, b in ek.tolist()}
        in_eval[sel] = [(int(a), int(b)) in pairs for a, b in zip(col["h_hi"][sel], col["h_lo"][sel])]
    return {"id_repeated": id_rep, "train_text_repeated": text_rep, "eval_text_in_train": in_eval}


def source_frame(layout: Layout) -> Any:
    import pandas as pd

    try:
        sources = read_manifest(layout.clean)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    raw = {s.name: s.docs for s in read_manifest(layout.raw)} if (layout.raw / "manifest.json").exists() else {}
    return sources, pd.DataFrame([
        {"source": s.name, "role": s.role, "lang": s.lang, "clean_docs": s.docs,
         "raw_docs": raw.get(s.name, s.docs),
         "keep_ratio": s.docs / raw[s.name] if raw.get(s.name) else 1.0}
        for s in sources
    ])


def doc_expectations(train_langs: list[str], params: dict[str, Any]) -> list[tuple[str, Any]]:
    """Per-document expectations on the statistics frame. Uniqueness and the eval/train barrier are corpus-wide
    flags computed beforehand (``corpus_flags``), so the frame can be validated in chunks of any size."""
    import great_expectations.expectations as gxe

    pandas = {"condition_parser": "pandas"}
    ex: list[tuple[str, Any]] = [
        ("text_not_null", gxe.ExpectColumnValuesToBeInSet(column="text_ok", value_set=[True])),
        ("text_not_empty", gxe.ExpectColumnValuesToBeBetween(column="n_chars", min_value=1)),
        ("id_unique", gxe.ExpectColumnValuesToBeInSet(column="id_repeated", value_set=[False])),
        ("role_known", gxe.ExpectColumnValuesToBeInSet(column="role", value_set=list(ROLES))),
        ("domain_known", gxe.ExpectColumnValuesToBeInSet(column="domain", value_set=list(DOMAINS))),
        ("text_is_nfc", gxe.ExpectColumnValuesToBeInSet(column="is_nfc", value_set=[True])),
        ("train_text_hash_unique", gxe.ExpectColumnValuesToBeInSet(
            column="train_text_repeated", value_set=[False], row_condition='role=="train"', **pandas)),
        ("no_eval_text_in_train", gxe.ExpectColumnValuesToBeInSet(
            column="eval_text_in_train", value_set=[False], row_condition='role=="train"', **pandas)),
    ]
    clean_filters = (section(params, "clean").get("filters") or {})
    for lang in sorted(train_langs):
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


def make_checkpoint(ctx: Any, name: str, expectations: list[tuple[str, Any]], index_col: str) -> Any:
    """One suite over a pandas frame, with Data Docs; ``run_checkpoint`` runs it on each chunk of rows."""
    import great_expectations as gx

    asset = ctx.data_sources.add_pandas(f"{name}_source").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=name))
    for ex_name, ex in expectations:
        ex.meta = {"name": ex_name}
        suite.add_expectation(ex)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite))
    return ctx.checkpoints.add(gx.Checkpoint(
        name=f"{name}_checkpoint", validation_definitions=[vd],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["cpt"])],
        result_format={"result_format": "SUMMARY", "unexpected_index_column_names": [index_col]},
    ))


def run_checkpoint(cp: Any, name: str, frame: Any, index_col: str) -> list[dict]:
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


def merge_results(chunks: list[list[dict]]) -> list[dict]:
    """Results of the same suite on several chunks of rows, as if it ran once on all of them."""
    merged: dict[str, dict] = {}
    for chunk in chunks:
        for r in chunk:
            m = merged.setdefault(r["name"], {**r, "element_count": 0, "unexpected_count": 0, "examples": []})
            m["success"] = m["success"] and r["success"]
            for k in ("element_count", "unexpected_count"):
                m[k] = (m[k] or 0) + (r[k] or 0)
            m["examples"] = (m["examples"] + r["examples"])[:20]
    return list(merged.values())


def doc_chunks(files: list[str], flags: dict[str, np.ndarray], chunk_docs: int) -> Any:
    """Pandas frames of the per-document statistics, about ``chunk_docs`` rows each, with the corpus flags."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pending: list[Any] = []
    n = start = 0
    for i, f in enumerate(files):
        pending.append(pq.read_table(f, columns=STATS_COLUMNS))
        n += pending[-1].num_rows
        if n >= chunk_docs or i == len(files) - 1:
            frame = pa.concat_tables(pending).to_pandas()
            for k, v in flags.items():
                frame[k] = v[start:start + n]
            yield frame
            start += n
            pending, n = [], 0


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
