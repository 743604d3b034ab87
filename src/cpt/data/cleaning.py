"""The clean chain (see ``cpt.stages.clean``) at corpus scale: per-shard tasks on the engine, corpus-wide dedup in
stages with intermediates on disk, and data/clean swapped in whole at the end.

1. Eval shards, then training shards (``cleanwork.prepare_shard``): normalise, filter, exact-dedup keys, and for
   training text the decontamination lookup (against the eval n-grams of step 1, one index file every task loads)
   and the MinHash signature + LSH band keys.
2. Exact dedup per hash partition (``dedup_staged.exact_partition``): duplicate -> first in input order.
3. Near dedup: LSH buckets per band -> candidate pairs -> verified -> connected components -> drop list
   (``dedup_staged``), exact duplicates left out as in the one-process chain.
4. ``cleanwork.finish_shard``: each shard minus its drops, plus its quarantine records.

The quarantine keeps the order of the one-process chain: normalise/filter drops in input order, then exact
duplicates, then contaminated documents, then near duplicates, each in input order. So does everything else: the
documents kept, their bytes, the ids a dropped document refers to. Only the work's placement changed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cpt.data import dedup
from cpt.data.cleanwork import finish_shard, prepare_shard, work_paths
from cpt.data.dedup_staged import SignatureStore, band_pairs, exact_partition, verify_and_cluster
from cpt.data.engine import Engine, EngineConfig
from cpt.data.records import SourceInfo, read_manifest, write_manifest
from cpt.errors import DataError
from cpt.io import replace_dir
from cpt.layout import Layout

log = logging.getLogger("cpt.stages.clean")
QUARANTINE = "quarantine.jsonl"
EXACT_PARTITION_DOCS = 4_000_000  # documents per exact-dedup partition (24 bytes each: ~100 MB per task)
COUNTERS = ("exact_duplicates", "near_duplicates", "decontaminated")


def _tasks(layout: Layout, sources: list[SourceInfo], work: Path, cfg: dict[str, Any], seed: int,
           bands: int, rows: int) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    g = 0
    n_train = sum(s.docs for s in sources if s.role == "train")
    parts = max(1, math.ceil(n_train / EXACT_PARTITION_DOCS))
    for src in sources:
        infos = list(src.shards) or [{"file": src.file, "docs": src.docs}]
        for k, (path, info) in enumerate(zip(src.paths(layout.raw), infos)):
            if not path.exists():
                raise DataError(f"{path}: listed in {layout.raw / 'manifest.json'} but missing; rerun ingest")
            tasks.append({"raw": str(path), "source": src.name, "lang": src.lang, "role": src.role,
                          "key": f"{src.name}/{k:05d}", "part": k, "g0": g, "work": str(work), "cfg": cfg,
                          "seed": seed, "parts": parts, "bands": bands, "rows": rows, "eval_index": None,
                          "bytes": int(info.get("bytes") or path.stat().st_size)})
            if src.role == "train":
                g += int(info["docs"])
    return tasks


def _eval_index(work: Path, results: list[dict[str, Any]], tasks: list[dict[str, Any]], cfg: dict[str, Any]) -> str:
    """One sorted n-gram index of every eval document, in manifest order (as ``EvalIndex.build``), on disk."""
    keys, owners, ids, texts = [], [], [], {}
    for t, r in zip(tasks, results):
        z = np.load(work_paths(str(work), t["key"])["evalgrams"])
        keys.append(z["keys"])
        owners.append(z["owners"] + len(ids))
        for h, o in r["eval_texts"]:
            texts.setdefault(h, o + len(ids))
        ids.extend(r["eval_ids"])
    k = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    o = np.concatenate(owners) if owners else np.zeros(0, np.int32)
    order = np.argsort(k, kind="stable")
    path = work / "evalindex.npz"
    np.savez(path, keys=k[order], owner=o[order].astype(np.int32))
    Path(str(path) + ".json").write_text(json.dumps({
        "ids": ids, "texts": sorted(texts.items(), key=lambda kv: kv[1]),
        "word_ngram": int(cfg["decontam"]["word_ngram"]), "char_ngram": int(cfg["decontam"]["char_ngram"])},
        ensure_ascii=False), encoding="utf-8")
    return str(path), int(len(k))


def _ref_ids(work: Path, tasks: list[dict[str, Any]], wanted: np.ndarray) -> dict[int, str]:
    """Ids of the documents that dropped ones refer to (first of an exact group, kept doc of a cluster)."""
    out: dict[int, str] = {}
    wanted = np.unique(wanted)
    g0 = np.asarray([t["g0"] for t in tasks], dtype=np.int64)
    shard = np.searchsorted(g0, wanted, side="right") - 1
    for s in np.unique(shard).tolist():
        p = work_paths(str(work), tasks[s]["key"])
        idx = np.load(p["idx"])
        ids = json.loads(p["ids"].read_text(encoding="utf-8"))
        for g in wanted[shard == s].tolist():
            out[g] = ids[int(np.searchsorted(idx, g))]
    return out


def _split(g: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    """Positions of ``g`` (sorted) per shard, shard s covering [bounds[s], bounds[s+1])."""
    cuts = np.searchsorted(g, bounds)
    return [np.arange(cuts[s], cuts[s + 1]) for s in range(len(bounds) - 1)]


def clean_corpus(cfg: dict[str, Any], seed: int, layout: Layout, engine: EngineConfig | None = None) -> dict[str, Any]:
    """The whole chain (module docstring) over data/raw; swaps in data/clean and returns the stage's metrics."""
    try:
        sources = read_manifest(layout.raw)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    dd = cfg["dedup"]
    if dd["bands"] and dd["rows"]:
        bands, rows = int(dd["bands"]), int(dd["rows"])
    else:
        bands, rows = dedup.lsh_params(float(dd["lsh_threshold"]), int(dd["num_perm"]))
    num_perm = int(dd["num_perm"])
    work = layout.clean.with_name(f".{layout.clean.name}.work")
    tmp = layout.clean.with_name(f".{layout.clean.name}.tmp")
    for d in (work, tmp):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    tasks = _tasks(layout, sources, work, cfg, seed, bands, rows)
    ev = [t for t in tasks if t["role"] == "eval"]
    tr = [t for t in tasks if t["role"] == "train"]
    timings: dict[str, float] = {}
    with Engine(engine) as eng:
        t0 = time.perf_counter()
        ev_res = eng.map(prepare_shard, [(t,) for t in ev], name="clean: eval shards")
        index_path, eval_ngrams = _eval_index(work, ev_res, ev, cfg)
        for t in tr:
            t["eval_index"] = index_path if cfg["decontam"]["enabled"] else None
        tr_res = eng.map(prepare_shard, [(t,) for t in tr], name="clean: training shards",
                         cost=[t["bytes"] for t in tr])
        timings["prepare"] = time.perf_counter() - t0
        worker: Counter[str] = Counter()
        for r in ev_res + tr_res:
            worker.update(r["timings"])

        # exact dedup, per hash partition
        t1 = time.perf_counter()
        keys = [t["key"] for t in tr]
        parts = tr[0]["parts"] if tr else 1
        ex = eng.map(exact_partition, [(str(work), p, keys) for p in range(parts)], name="clean: exact dedup")
        ex_dup = np.concatenate([d for d, _ in ex]) if ex else np.zeros(0, np.int64)
        ex_first = np.concatenate([f for _, f in ex]) if ex else np.zeros(0, np.int64)
        if not dd["exact"]:
            ex_dup, ex_first = ex_dup[:0], ex_first[:0]
        o = np.argsort(ex_dup)
        ex_dup, ex_first = ex_dup[o], ex_first[o]
        np.save(work / "exact_dups.npy", ex_dup)
        timings["exact_dedup"] = time.perf_counter() - t1

        # near dedup: buckets per band, then verify + connected components
        t2 = time.perf_counter()
        near_info: dict[str, Any] = {"bands": bands, "rows": rows, "threshold": float(dd["threshold"]),
                                     "num_perm": num_perm}
        near = {"dup": np.zeros(0, np.int64), "root": np.zeros(0, np.int64), "jaccard": np.zeros(0)}
        if dd["near"] and sum(r["kept"] for r in tr_res) > 1:
            eng.map(band_pairs, [(str(work), b, keys, str(work / "exact_dups.npy")) for b in range(bands)],
                    name="clean: LSH buckets")
            store = SignatureStore(str(work), keys, [t["g0"] for t in tr])
            near = verify_and_cluster(str(work), bands, store, num_perm, float(dd["threshold"]))
            near_info.update({k: near[k] for k in ("candidate_pairs", "verified_pairs", "clusters",
                                                   "largest_cluster")})
        timings["lsh"] = time.perf_counter() - t2

        # write: each shard minus its drops
        t3 = time.perf_counter()
        ref = _ref_ids(work, tr, np.concatenate([ex_first, near["root"]]))
        bounds = np.asarray([t["g0"] for t in tr] + [tr[-1]["g0"] + 2**62] if tr else [0], dtype=np.int64)
        ex_split, nr_split = _split(ex_dup, bounds), _split(near["dup"], bounds)
        fin_tasks = []
        for t in ev + tr:
            out = tmp / t["source"] / f"part-{t['part']:05d}.jsonl.zst"
            task = {"key": t["key"], "work": str(work), "out": str(out), "source": t["source"],
                    "train": t["role"] == "train", "exact": [], "near": []}
            if t["role"] == "train":
                s = tr.index(t)
                task["exact"] = [(int(ex_dup[i]), ref[int(ex_first[i])]) for i in ex_split[s]]
                task["near"] = [(int(near["dup"][i]), ref[int(near["root"][i])], float(near["jaccard"][i]))
                                for i in nr_split[s]]
            fin_tasks.append((task,))
        fin = dict(zip([t["key"] for t in ev + tr], eng.map(finish_shard, fin_tasks, name="clean: write",
                                                                      cost=[t["bytes"] for t in ev + tr])))
    metrics = _assemble(layout, sources, tasks, ev_res + tr_res, fin, work, tmp)
    timings["write"] = time.perf_counter() - t3
    replace_dir(tmp, layout.clean)
    shutil.rmtree(work, ignore_errors=True)
    metrics.update(eval_ngrams=eval_ngrams, near_dedup=near_info, engine=eng.summary(),
                   timings={**{k: round(v, 3) for k, v in timings.items()},
                            **{f"workers_{k}": round(v, 3) for k, v in sorted(worker.items())}})
    log.info("%d -> %d docs (%.1f -> %.1f MB); rejected %s, exact dups %d, near dups %d, decontaminated %d",
             metrics["docs_in"], metrics["docs_out"], metrics["bytes_in"] / 1e6, metrics["bytes_out"] / 1e6,
             metrics["rejected"], metrics["exact_duplicates"], metrics["near_duplicates"], metrics["decontaminated"])
    return metrics


def _assemble(layout: Layout, sources: list[SourceInfo], tasks: list[dict[str, Any]], prep: list[dict[str, Any]],
              fin: dict[str, dict[str, Any]], work: Path, tmp: Path) -> dict[str, Any]:
    """Manifest, quarantine (phase by phase, shard by shard) and metrics of the finished shards."""
    prep_by_key = {t["key"]: r for t, r in zip([t for t in tasks if t["role"] == "eval"]
                                               + [t for t in tasks if t["role"] == "train"], prep)}
    by_source: dict[str, dict[str, Any]] = {}
    infos = []
    for src in sources:
        s = {"docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0, "rejected": Counter(),
             **{c: 0 for c in COUNTERS}}
        shards = []
        for t in (t for t in tasks if t["source"] == src.name):
            r, f = prep_by_key[t["key"]], fin[t["key"]]
            s["docs_in"] += r["stats"]["docs_in"]
            s["bytes_in"] += r["stats"]["bytes_in"]
            s["rejected"].update(r["stats"]["rejected"])
            s["docs_out"] += f["shard"]["docs"]
            s["bytes_out"] += f["shard"]["bytes"]
            for c in COUNTERS:
                s[c] += f[c]
            shards.append(f["shard"])
        if s["docs_out"] == 0:
            log.warning("%s: every document was dropped (see %s)", src.name, layout.clean / QUARANTINE)
        by_source[src.name] = {**s, "rejected": dict(sorted(s["rejected"].items())), "role": src.role,
                               "lang": src.lang}
        infos.append(SourceInfo(src.name, src.lang, src.domain, src.role, src.name, s["docs_out"], tuple(shards)))
    n_q = 0
    with open(tmp / QUARANTINE, "wb") as out:
        for phase in ("q1", "out_q_exact", "out_q_contam", "out_q_near"):
            for t in tasks:
                path = work_paths(str(work), t["key"])[phase]
                if path.exists():
                    with open(path, "rb") as fh:
                        for line in fh:
                            out.write(line)
                            n_q += 1
    write_manifest(tmp, infos)
    rejected: Counter[str] = Counter()
    for s in by_source.values():
        rejected.update(s["rejected"])
    metrics = {key: sum(s[key] for s in by_source.values())
               for key in ("docs_in", "docs_out", "bytes_in", "bytes_out", *COUNTERS)}
    metrics.update(rejected=dict(sorted(rejected.items())), quarantined=n_q, by_source=by_source)
    return metrics
