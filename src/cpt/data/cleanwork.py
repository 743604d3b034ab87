"""The per-shard tasks of ``cpt clean`` (run by ``cpt.data.engine``; module-level functions of plain arguments).

Pass 1, ``prepare_shard``: one raw shard -> its normalised survivors on disk, plus everything the corpus-wide steps
need and nothing more: the phase-1 quarantine (empty after normalisation, failed filters), the exact-dedup keys
(128-bit text hash + the document's global index, split into hash partitions), and for training documents the
decontamination verdict and the MinHash signature with its LSH band keys. Eval shards also write their
decontamination n-grams. No task holds more than its own shard.

Pass 2, ``finish_shard``: the shard's survivors minus the corpus-wide drop lists -> the clean shard and its
quarantine records, line for line in input order (lines are copied as bytes, never re-serialised).

A document's global index ``g`` counts the training documents of the raw manifest in order (source, shard, line),
so ``g`` order is input order and every "first in input order is kept" rule of the one-process stage holds.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cpt.data import dedup, filters, shardio, textnorm
from cpt.data.decontam import EvalIndex

EXACT_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("g", "<i8")])


def work_paths(work: str, key: str) -> dict[str, Path]:
    """Where one shard's intermediates live (``key`` = ``<source>/<part>``)."""
    w = Path(work)
    return {name: w / name / f"{key}.{ext}" for name, ext in (
        ("norm", "jsonl.zst"), ("idx", "npy"), ("nbytes", "npy"), ("ids", "json"), ("q1", "jsonl"),
        ("sig", "npy"), ("sig_g", "npy"), ("bands", "npy"), ("contam", "jsonl"), ("evalgrams", "npz"),
        ("out_q_exact", "jsonl"), ("out_q_contam", "jsonl"), ("out_q_near", "jsonl"),
    )}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False))
            fh.write("\n")


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)


def text_hash128(text: str) -> tuple[int, int]:
    """``textnorm.text_hash`` as two 64-bit integers (the same 128 bits, fixed-width for numpy)."""
    h = bytes.fromhex(textnorm.text_hash(text))
    return int.from_bytes(h[:8], "big"), int.from_bytes(h[8:], "big")


def prepare_shard(t: dict[str, Any]) -> dict[str, Any]:
    """Pass 1 on one raw shard. ``t``: raw, source, lang, role, key, g0, work, cfg, seed, eval_index, parts."""
    cfg = t["cfg"]
    p = work_paths(t["work"], t["key"])
    is_eval = t["role"] == "eval"
    th = filters.thresholds(cfg["filters"] or {}, t["lang"])
    wiki, drop_sections = bool(cfg["wiki_markup"]), cfg["drop_sections"]
    dd, dc = cfg["dedup"], cfg["decontam"]
    stats: dict[str, Any] = {"docs_in": 0, "bytes_in": 0, "rejected": Counter(), "kept": 0}
    timings: Counter[str] = Counter()
    q1: list[dict[str, Any]] = []
    idx: list[int] = []
    nbytes: list[int] = []
    ids: list[str] = []
    exact: list[tuple[int, int, int]] = []
    evalgrams = EvalIndex(word_ngram=int(dc["word_ngram"]), char_ngram=int(dc["char_ngram"])) if is_eval else None
    texts: list[str] = []  # the shard's surviving training texts, for the decontam + MinHash part below
    langs_mode = "char" if t["lang"] in dedup.CHAR_LANGS else "word"
    writer = shardio.LineWriter(p["norm"])
    t0 = time.perf_counter()
    for j, line in enumerate(shardio.read_lines(t["raw"])):
        doc = json.loads(line)
        g = int(t["g0"]) + j
        stats["docs_in"] += 1
        stats["bytes_in"] += len(doc["text"].encode("utf-8"))
        text = textnorm.normalize(doc["text"], wiki=wiki, drop_sections=drop_sections)
        doc = {**doc, "text": text}
        if not text:
            stats["rejected"]["empty"] += 1
            q1.append({"id": doc["id"], "source": doc["source"], "reason": "empty",
                       "detail": "no text left after normalisation", "ref": None})
            continue
        if not is_eval:
            failed = filters.check(text, t["lang"], th)
            if failed is not None:
                stats["rejected"][failed[0]] += 1
                q1.append({"id": doc["id"], "source": doc["source"], "reason": failed[0], "detail": failed[1],
                           "ref": None})
                continue
            exact.append((*text_hash128(text), g))
            texts.append(text)
        elif evalgrams is not None and dc["enabled"]:
            evalgrams.add(text, t["lang"], doc["source"], doc["id"])
        writer.write(doc)
        idx.append(g)
        nbytes.append(len(text.encode("utf-8")))
        ids.append(doc["id"])
    norm_info = writer.close()
    timings["normalise_filter"] = time.perf_counter() - t0
    stats["kept"] = len(idx)
    _save(p["idx"], np.asarray(idx, dtype=np.int64))
    _save(p["nbytes"], np.asarray(nbytes, dtype=np.int64))
    p["ids"].parent.mkdir(parents=True, exist_ok=True)
    p["ids"].write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    _write_jsonl(p["q1"], q1)
    if evalgrams is not None:
        p["evalgrams"].parent.mkdir(parents=True, exist_ok=True)
        np.savez(p["evalgrams"], keys=np.concatenate(evalgrams._parts) if evalgrams._parts else np.zeros(0, np.uint64),
                 owners=np.concatenate(evalgrams._owners) if evalgrams._owners else np.zeros(0, np.int32))
        return {"stats": stats, "timings": dict(timings), "eval_ids": evalgrams._ids,
                "eval_texts": list(evalgrams._texts.items()), "norm": norm_info}
    # exact-dedup keys, one file per hash partition (a partition holds whole groups of equal texts)
    ex = np.array(exact, dtype=EXACT_DTYPE)
    part = (ex["hi"] >> np.uint64(56)).astype(np.int64) % int(t["parts"]) if len(ex) else np.zeros(0, np.int64)
    for k in range(int(t["parts"])):
        _save(Path(t["work"]) / "exact" / f"p{k}" / f"{t['key']}.npy", ex[part == k])
    # decontamination and MinHash: one tokenisation per document, as in the one-process stage
    t1 = time.perf_counter()
    index = load_eval_index(t["eval_index"]) if dc["enabled"] else None
    timings["decontam"] += time.perf_counter() - t1
    contam: list[dict[str, Any]] = []
    empty = np.zeros(0, dtype=np.uint64)
    n = int(dd["char_ngram"] if langs_mode == "char" else dd["word_ngram"])

    def shingle_stream():
        for i, text in enumerate(texts):
            toks = dedup.token_hashes(text, langs_mode)
            if index is not None:
                td = time.perf_counter()
                hit = index.find(text, t["lang"], toks)
                timings["decontam"] += time.perf_counter() - td
                if hit is not None:
                    contam.append({"g": idx[i], "id": ids[i], "source": t["source"], "reason": "contaminated",
                                   "detail": f"by {hit.eval_source} ({hit.eval_id}): {hit.ngram[:120]!r}",
                                   "ref": hit.eval_id})
                    yield empty
                    continue
            yield dedup.shingles(toks.hashes(norm_numbers=True), n) if dd["near"] else empty

    t2 = time.perf_counter()
    d0 = timings["decontam"]
    sig = dedup.MinHasher(num_perm=int(dd["num_perm"]), seed=int(t["seed"])).signatures(shingle_stream(), len(texts))
    timings["minhash"] = time.perf_counter() - t2 - (timings["decontam"] - d0)
    # contaminated documents, and documents without a token, keep an all-0xFFFFFFFF row: never LSH candidates
    keep = ~(sig == 0xFFFFFFFF).all(axis=1)
    sig, sig_g = sig[keep], np.asarray(idx, dtype=np.int64)[keep]
    _write_jsonl(p["contam"], contam)
    _save(p["sig"], sig)
    _save(p["sig_g"], sig_g)
    _save(p["bands"], band_keys(sig, int(t["bands"]), int(t["rows"]), int(t["seed"])))
    return {"stats": stats, "timings": dict(timings), "norm": norm_info, "kept": len(idx)}


def band_keys(sig: np.ndarray, bands: int, rows: int, seed: int) -> np.ndarray:
    """(n, bands) uint64: the LSH bucket key of every band, exactly as ``dedup.near_duplicates`` computes it."""
    mult = np.random.default_rng(seed).integers(1, 2**63, size=rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    out = np.zeros((len(sig), bands), dtype=np.uint64)
    for b in range(bands):
        out[:, b] = (sig[:, b * rows:(b + 1) * rows].astype(np.uint64) * mult).sum(axis=1)
    return out


_INDEX_CACHE: dict[str, EvalIndex] = {}


def load_eval_index(path: str | None) -> EvalIndex | None:
    """The eval n-gram index a worker loads once per stage run (cached per process by path and mtime)."""
    if not path:
        return None
    key = f"{path}:{os.stat(path).st_mtime_ns}"
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = _load_eval_index(path)
    return _INDEX_CACHE[key]


def _load_eval_index(path: str) -> EvalIndex:
    z = np.load(path)
    meta = json.loads(Path(str(path) + ".json").read_text(encoding="utf-8"))
    idx = EvalIndex(word_ngram=meta["word_ngram"], char_ngram=meta["char_ngram"])
    idx._ids = [tuple(x) for x in meta["ids"]]
    idx._texts = dict(meta["texts"])
    idx.keys, idx.owner = z["keys"], z["owner"]
    idx.bitmap = np.zeros(1 << idx.BITMAP_BITS, dtype=bool)
    idx.bitmap[(idx.keys & np.uint64((1 << idx.BITMAP_BITS) - 1)).astype(np.intp)] = True
    return idx


def finish_shard(t: dict[str, Any]) -> dict[str, Any]:
    """Pass 2 on one shard. ``t``: key, work, out, exact [(g, first_id)], near [(g, root_id, jaccard)], train."""
    p = work_paths(t["work"], t["key"])
    idx = np.load(p["idx"])
    nbytes = np.load(p["nbytes"])
    exact = {int(g): ref for g, ref in t["exact"]}
    near = {int(g): (ref, jac) for g, ref, jac in t["near"]}
    contam: dict[int, dict[str, Any]] = {}
    if t["train"] and p["contam"].exists():
        with open(p["contam"], encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                contam[int(row.pop("g"))] = row
    ids = json.loads(p["ids"].read_text(encoding="utf-8"))
    q: dict[str, list[dict[str, Any]]] = {"exact": [], "contam": [], "near": []}
    keep = np.ones(len(idx), dtype=bool)
    for j, g in enumerate(idx.tolist()):
        if g in exact:
            ref = exact[g]
            q["exact"].append({"id": ids[j], "source": t["source"], "reason": "exact_duplicate",
                               "detail": f"same normalised text as {ref}", "ref": ref})
        elif g in contam:
            q["contam"].append(contam[g])
        elif g in near:
            ref, jac = near[g]
            q["near"].append({"id": ids[j], "source": t["source"], "reason": "near_duplicate",
                              "detail": f"of {ref} (cluster kept doc; est. Jaccard {jac:.2f})", "ref": ref})
        else:
            continue
        keep[j] = False
    for name in q:
        _write_jsonl(p[f"out_q_{name}"], q[name])
    out = Path(t["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    if keep.all():  # nothing dropped: the normalised shard is the clean shard, byte for byte
        os.replace(p["norm"], out)
        info = {"file": out.name, "docs": int(len(idx)), "sha256": shardio.file_sha256(out)}
    else:
        writer = shardio.LineWriter(out)
        for j, line in enumerate(shardio.read_lines(p["norm"])):
            if keep[j]:
                writer.write_line(line)
        info = writer.close()
        info.pop("bytes")
    info["bytes"] = int(nbytes[keep].sum())  # UTF-8 bytes of the texts, as metrics/clean.json counts them
    return {"shard": info, "exact_duplicates": len(q["exact"]), "decontaminated": len(q["contam"]),
            "near_duplicates": len(q["near"])}
