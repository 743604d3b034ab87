"""Corpus-wide exact and near dedup in stages, intermediates on disk (datatrove / NeMo Curator style).

The per-shard tasks (``cleanwork.prepare_shard``) write each document's 128-bit text hash, MinHash signature and
LSH band keys, tagged with its global index ``g`` (input order). The steps here then work on those small numbers,
never on texts:

1. ``exact_partition``: the hash keys of one partition (by high hash bits, so equal texts share one), stably sorted;
   every document after the first of its text is an exact duplicate of that first one.
2. ``band_pairs``: one LSH band over the whole corpus (16 bytes per document): documents with equal band keys
   form a bucket, and a bucket yields candidate pairs with the same rule as ``dedup.near_duplicates`` (all pairs
   while small, else each member with the first and with its predecessor).
3. ``verify_and_cluster``: the candidate pairs of every band, deduplicated, verified on the full signatures
   (estimated Jaccard >= threshold, signatures read from the shard files), then connected components; the smallest
   ``g`` of a component is the kept document, as union-find with "smaller index wins" gives in the one-process code.

Memory bounds: step 1 holds 24 bytes per document of its partition, step 2 16 bytes per document for one band,
step 3 the candidate pairs and their two signatures. Steps 1 and 2 are tasks the engine runs in parallel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def exact_partition(work: str, part: int, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate g, first g) for one hash partition, ordered by duplicate g."""
    arrs = [np.load(Path(work) / "exact" / f"p{part}" / f"{k}.npy") for k in keys]
    ex = np.concatenate(arrs) if arrs else np.zeros(0, dtype=[("hi", "<u8"), ("lo", "<u8"), ("g", "<i8")])
    if len(ex) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((ex["g"], ex["lo"], ex["hi"]))  # by text hash, then input order
    s = ex[order]
    same = (s["hi"][1:] == s["hi"][:-1]) & (s["lo"][1:] == s["lo"][:-1])
    run_start = np.flatnonzero(np.r_[True, ~same])
    first = np.repeat(s["g"][run_start], np.diff(np.r_[run_start, len(s)]))
    dup = np.r_[False, same]
    d, f = s["g"][dup], first[dup]
    o = np.argsort(d)
    return d[o], f[o]


def band_pairs(work: str, band: int, keys: list[str], exact_dups: str, max_bucket_pairs: int = 64) -> int:
    """Candidate pairs (g_a < g_b) of one band into ``pairs/b<band>.npy``; returns their number."""
    w = Path(work)
    dups = np.load(exact_dups)
    ks, gs = [], []
    for k in keys:
        g = np.load(w / "sig_g" / f"{k}.npy")
        if not len(g):
            continue
        bk = np.load(w / "bands" / f"{k}.npy", mmap_mode="r")[:, band]
        ok = ~np.isin(g, dups)
        ks.append(np.asarray(bk)[ok])
        gs.append(g[ok])
    pairs: list[np.ndarray] = []
    if ks:
        key, g = np.concatenate(ks), np.concatenate(gs)
        order = np.argsort(key, kind="stable")  # stable: members of a bucket in input order
        skey = key[order]
        same = skey[1:] == skey[:-1]
        if same.any():
            run_start = np.flatnonzero(np.r_[True, ~same])
            run_len = np.diff(np.r_[run_start, len(order)])
            for s, ln in zip(run_start[run_len > 1], run_len[run_len > 1]):
                members = g[order[s:s + ln]]
                if ln * (ln - 1) // 2 <= max_bucket_pairs:
                    a, b = np.triu_indices(ln, 1)
                    pairs.append(np.stack([members[a], members[b]], axis=1))
                else:
                    pairs.append(np.stack([np.full(ln - 1, members[0]), members[1:]], axis=1))
                    pairs.append(np.stack([members[:-1], members[1:]], axis=1))
    out = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    (w / "pairs").mkdir(parents=True, exist_ok=True)
    np.save(w / "pairs" / f"b{band}.npy", out.astype(np.int64))
    return len(out)


class SignatureStore:
    """Signature rows by global index, read from the per-shard files (only the shards a lookup touches)."""

    def __init__(self, work: str, keys: list[str], g0: list[int]) -> None:
        self.work, self.keys, self.g0 = Path(work), keys, np.asarray(g0, dtype=np.int64)

    def rows(self, g: np.ndarray, num_perm: int) -> np.ndarray:
        out = np.zeros((len(g), num_perm), dtype=np.uint32)
        shard = np.searchsorted(self.g0, g, side="right") - 1
        for s in np.unique(shard).tolist():
            sel = np.flatnonzero(shard == s)
            k = self.keys[s]
            sg = np.load(self.work / "sig_g" / f"{k}.npy")
            sig = np.load(self.work / "sig" / f"{k}.npy", mmap_mode="r")
            out[sel] = sig[np.searchsorted(sg, g[sel])]
        return out


def verify_and_cluster(work: str, bands: int, store: SignatureStore, num_perm: int, threshold: float,
                       chunk: int = 200_000) -> dict[str, Any]:
    """Drop list of near duplicates: ``dup`` g, its cluster's kept ``root`` g and their estimated Jaccard."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    w = Path(work)
    parts = [np.load(w / "pairs" / f"b{b}.npy") for b in range(bands)]
    cand = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    empty = {"dup": np.zeros(0, np.int64), "root": np.zeros(0, np.int64), "jaccard": np.zeros(0),
             "candidate_pairs": 0, "verified_pairs": 0, "clusters": 0, "largest_cluster": 1}
    if not len(cand):
        return empty
    cand = np.unique(np.sort(cand, axis=1), axis=0)
    ok_parts = []
    for s in range(0, len(cand), chunk):
        c = cand[s:s + chunk]
        est = (store.rows(c[:, 0], num_perm) == store.rows(c[:, 1], num_perm)).mean(axis=1)
        ok_parts.append(c[est >= threshold])
    ok = np.concatenate(ok_parts)
    result = {**empty, "candidate_pairs": int(len(cand)), "verified_pairs": int(len(ok))}
    if not len(ok):
        return result
    nodes, inv = np.unique(ok, return_inverse=True)
    inv = inv.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(ok), dtype=np.int8), (inv[:, 0], inv[:, 1])), shape=(len(nodes), len(nodes)))
    n_comp, label = connected_components(graph, directed=False)
    root_of_label = np.full(n_comp, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(root_of_label, label, nodes)
    root = root_of_label[label]
    dup = root != nodes
    d, r = nodes[dup], root[dup]
    jac = np.zeros(len(d))
    for s in range(0, len(d), chunk):
        jac[s:s + chunk] = (store.rows(d[s:s + chunk], num_perm) == store.rows(r[s:s + chunk], num_perm)).mean(axis=1)
    sizes = np.bincount(label)
    result.update(dup=d, root=r, jaccard=jac, clusters=int(n_comp), largest_cluster=int(sizes.max()))
    return result
