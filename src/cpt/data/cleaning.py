"""The clean chain (see ``cpt.stages.clean``): normalise, filter, exact dedup, decontaminate, near dedup, then write
data/clean with every dropped document in the quarantine file and counted in the metrics."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cpt.data import dedup, filters, textnorm
from cpt.data.decontam import EvalIndex
from cpt.data.records import SourceInfo, read_manifest, write_manifest
from cpt.errors import DataError
from cpt.io import atomic_open, read_jsonl, write_jsonl
from cpt.layout import Layout
from cpt.progress import progress

log = logging.getLogger("cpt.stages.clean")
QUARANTINE = "quarantine.jsonl"


class Stats:
    """Per-source counters; every dropped document passes through ``drop``."""

    def __init__(self) -> None:
        self.by_source: dict[str, dict[str, Any]] = defaultdict(lambda: {
            "docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0, "rejected": Counter(),
            "exact_duplicates": 0, "near_duplicates": 0, "decontaminated": 0,
        })
        self.quarantine: list[dict[str, Any]] = []

    def drop(self, doc: dict[str, Any], reason: str, detail: str, ref: str | None = None) -> None:
        s = self.by_source[doc["source"]]
        if reason == "exact_duplicate":
            s["exact_duplicates"] += 1
        elif reason == "near_duplicate":
            s["near_duplicates"] += 1
        elif reason == "contaminated":
            s["decontaminated"] += 1
        else:
            s["rejected"][reason] += 1
        self.quarantine.append({"id": doc["id"], "source": doc["source"], "reason": reason, "detail": detail,
                                "ref": ref})


def clean_corpus(cfg: dict[str, Any], seed: int, layout: Layout) -> dict[str, Any]:
    """The whole chain (module docstring) over data/raw; writes data/clean and returns the stage's metrics."""
    try:
        sources = read_manifest(layout.raw)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    timings: dict[str, float] = {}
    stats = Stats()
    t0 = time.perf_counter()

    # 1-2. normalise everything, filter training documents
    kept: dict[str, list[dict[str, Any]]] = {}
    train: list[dict[str, Any]] = []  # surviving training docs, in manifest then file order
    eval_index = EvalIndex(word_ngram=int(cfg["decontam"]["word_ngram"]), char_ngram=int(cfg["decontam"]["char_ngram"]))
    total = sum(s.docs for s in sources)
    bar = progress(total=total, desc="clean: normalise+filter", unit=" docs")
    for src in sources:
        path = layout.raw / src.file
        if not path.exists():
            raise DataError(f"{path}: listed in {layout.raw / 'manifest.json'} but missing; rerun ingest")
        th = filters.thresholds(cfg["filters"] or {}, src.lang)
        out = kept[src.name] = []
        for doc in read_jsonl(path):
            bar.update(1)
            s = stats.by_source[src.name]
            s["docs_in"] += 1
            s["bytes_in"] += len(doc["text"].encode("utf-8"))
            text = textnorm.normalize(doc["text"], wiki=bool(cfg["wiki_markup"]), drop_sections=cfg["drop_sections"])
            doc = {**doc, "text": text}
            if not text:
                stats.drop(doc, "empty", "no text left after normalisation")
                continue
            if src.role == "eval":
                out.append(doc)
                if cfg["decontam"]["enabled"]:
                    eval_index.add(text, src.lang, src.name, doc["id"])
                continue
            failed = filters.check(text, src.lang, th)
            if failed is not None:
                stats.drop(doc, failed[0], failed[1])
                continue
            train.append(doc)
    bar.close()
    timings["normalise_filter"] = time.perf_counter() - t0

    # 3. exact dedup (normalised-text hash), first occurrence kept
    t = time.perf_counter()
    first_of: dict[str, str] = {}
    survivors: list[dict[str, Any]] = []
    for doc in train:
        h = textnorm.text_hash(doc["text"])
        if cfg["dedup"]["exact"] and h in first_of:
            stats.drop(doc, "exact_duplicate", f"same normalised text as {first_of[h]}", first_of[h])
            continue
        first_of.setdefault(h, doc["id"])
        survivors.append(doc)
    timings["exact_dedup"] = time.perf_counter() - t

    # 4 + 5a. one tokenisation per training doc: decontamination check, then MinHash shingles of the clean ones
    t = time.perf_counter()
    eval_index.build()
    dd = cfg["dedup"]
    clean_mask = np.ones(len(survivors), dtype=bool)
    t_decontam = 0.0

    def shingle_stream() -> Iterator[np.ndarray]:
        nonlocal t_decontam
        for i, doc in enumerate(progress(survivors, desc="clean: decontam+minhash", unit=" docs")):
            mode = "char" if doc["lang"] in dedup.CHAR_LANGS else "word"
            toks = dedup.token_hashes(doc["text"], mode)
            if cfg["decontam"]["enabled"]:
                td = time.perf_counter()
                hit = eval_index.find(doc["text"], doc["lang"], toks)
                t_decontam += time.perf_counter() - td
                if hit is not None:
                    clean_mask[i] = False
                    stats.drop(doc, "contaminated", f"by {hit.eval_source} ({hit.eval_id}): {hit.ngram[:120]!r}",
                               hit.eval_id)
                    yield np.zeros(0, dtype=np.uint64)
                    continue
            if not dd["near"]:
                yield np.zeros(0, dtype=np.uint64)
                continue
            n = int(dd["char_ngram"] if mode == "char" else dd["word_ngram"])
            yield dedup.shingles(toks.hashes(norm_numbers=True), n)

    minhasher = dedup.MinHasher(num_perm=int(dd["num_perm"]), seed=seed)
    sig = minhasher.signatures(shingle_stream(), len(survivors))
    timings["decontam"] = t_decontam
    timings["minhash"] = time.perf_counter() - t - t_decontam

    # 5b. LSH clusters, first in input order kept
    t = time.perf_counter()
    if dd["bands"] and dd["rows"]:
        bands, rows = int(dd["bands"]), int(dd["rows"])
    else:
        bands, rows = dedup.lsh_params(float(dd["lsh_threshold"]), int(dd["num_perm"]))
    near_info: dict[str, Any] = {"bands": bands, "rows": rows, "threshold": float(dd["threshold"]),
                                 "num_perm": int(dd["num_perm"])}
    drop_near = np.zeros(len(survivors), dtype=bool)
    if dd["near"] and len(survivors) > 1:
        res = dedup.near_duplicates(sig, bands, rows, threshold=float(dd["threshold"]), seed=seed)
        for i in res.duplicates.tolist():
            r = int(res.root[i])
            jac = float((sig[i] == sig[r]).mean())
            drop_near[i] = True
            stats.drop(survivors[i], "near_duplicate",
                       f"of {survivors[r]['id']} (cluster kept doc; est. Jaccard {jac:.2f})", survivors[r]["id"])
        sizes = Counter(res.root.tolist())
        multi = [c for c in sizes.values() if c > 1]
        near_info.update(candidate_pairs=res.candidate_pairs, verified_pairs=res.verified_pairs,
                         clusters=len(multi), largest_cluster=max(multi, default=1))
    timings["lsh"] = time.perf_counter() - t

    # 6. write outputs: survivors in input order per source, eval sources whole
    t = time.perf_counter()
    keep_ids = {doc["id"] for i, doc in enumerate(survivors) if clean_mask[i] and not drop_near[i]}
    if layout.clean.exists():
        shutil.rmtree(layout.clean)
    layout.clean.mkdir(parents=True)
    infos: list[SourceInfo] = []
    for src in sources:
        docs = kept[src.name] if src.role == "eval" else [d for d in kept_train(train, src.name) if d["id"] in keep_ids]
        s = stats.by_source[src.name]
        with atomic_open(layout.clean / src.file) as fh:
            for doc in docs:
                fh.write(json.dumps(doc, ensure_ascii=False))
                fh.write("\n")
                s["docs_out"] += 1
                s["bytes_out"] += len(doc["text"].encode("utf-8"))
        if s["docs_out"] == 0:
            log.warning("%s: every document was dropped (see %s)", src.name, layout.clean / QUARANTINE)
        infos.append(SourceInfo(src.name, src.lang, src.domain, src.role, src.file, s["docs_out"]))
    write_jsonl(layout.clean / QUARANTINE, stats.quarantine)
    write_manifest(layout.clean, infos)
    timings["write"] = time.perf_counter() - t

    by_source = {}
    for src in sources:
        s = stats.by_source[src.name]
        by_source[src.name] = {**s, "rejected": dict(sorted(s["rejected"].items())), "role": src.role,
                               "lang": src.lang}
    rejected: Counter[str] = Counter()
    for s in by_source.values():
        rejected.update(s["rejected"])
    metrics = {
        key: sum(s[key] for s in by_source.values())
        for key in ("docs_in", "docs_out", "bytes_in", "bytes_out", "exact_duplicates", "near_duplicates",
                    "decontaminated")
    }
    metrics.update(
        rejected=dict(sorted(rejected.items())),
        quarantined=len(stats.quarantine),
        eval_ngrams=eval_index.size,
        near_dedup=near_info,
        timings={k: round(v, 3) for k, v in timings.items()},
        by_source=by_source,
    )
    log.info("%d -> %d docs (%.1f -> %.1f MB); rejected %s, exact dups %d, near dups %d, decontaminated %d",
             metrics["docs_in"], metrics["docs_out"], metrics["bytes_in"] / 1e6, metrics["bytes_out"] / 1e6,
             dict(rejected), metrics["exact_duplicates"], metrics["near_duplicates"], metrics["decontaminated"])
    return metrics


def kept_train(train: list[dict[str, Any]], source: str) -> Iterator[dict[str, Any]]:
    return (d for d in train if d["source"] == source)


def quarantine_path(layout: Layout) -> Path:
    return layout.clean / QUARANTINE
