"""Benchmark: cpt's clean stage (and its MinHash near-dedup alone) vs datatrove's 4-step MinHash dedup pipeline, on a
viwiki slice, in the same run, per core, plus the keep/drop agreement of the two dedups.

    .venv/bin/python bench/bench_clean.py [--docs 3000] [--sample first|uniform] [--out bench/results/clean.json]

Settings are made equivalent: the same documents (cpt-normalised, filtered and exact-deduplicated, so only the
near-dup decision is compared), word 5-grams, the same text simplification (lowercase, punctuation removed, numbers
folded, diacritics KEPT — datatrove's default strips them, which would merge distinct Vietnamese words), the same LSH
bands x rows (cpt's choice for lsh_threshold), datatrove with a plain whitespace word tokenizer (its default for
Vietnamese is spaCy, slower: this favours datatrove). Both run single-process; "per core" = CPU seconds of this
process and its children (`resource.getrusage`), so numbers hold on a busy machine; wall seconds are reported too.
cpt verifies LSH candidates at the Jaccard threshold, datatrove does not: agreement is measured with cpt's defaults.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cpt.data import dedup  # noqa: E402
from cpt.stages import clean  # noqa: E402
from cpt.io import read_jsonl, write_json, write_jsonl  # noqa: E402
from cpt.layout import Layout  # noqa: E402
from cpt.data.records import SourceInfo, iter_docs, write_manifest  # noqa: E402


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class Timer:
    def __enter__(self):
        self.cpu0, self.wall0 = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu = cpu_seconds() - self.cpu0
        self.wall = time.perf_counter() - self.wall0


def load_viwiki(corpora: Path, n: int, sample: str, seed: int) -> list[dict]:
    with gzip.open(corpora / "viwiki" / "viwiki.jsonl.gz", "rt", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    if sample == "uniform":
        idx = np.sort(np.random.default_rng(seed).choice(len(docs), size=min(n, len(docs)), replace=False))
        docs = [docs[i] for i in idx]
    return docs[:n]


def run_cpt_stage(docs: list[dict], work: Path, params: dict) -> tuple[Timer, dict, Layout]:
    layout = Layout(work / "cpt")
    rows = [{"id": f"viwiki/{d['id']}", "source": "viwiki", "lang": "vi", "domain": "new", "role": "train",
             "text": d["text"]} for d in docs]
    write_jsonl(layout.raw / "viwiki.jsonl", rows)
    write_manifest(layout.raw, [SourceInfo("viwiki", "vi", "new", "train", "viwiki.jsonl", len(rows))])
    with Timer() as t:
        metrics = clean.run(params, layout)
    return t, metrics, layout


def run_cpt_neardup(texts: list[str], dd: dict, seed: int) -> tuple[Timer, np.ndarray]:
    """cpt's near-dedup alone (tokenise, shingle, MinHash, LSH + verification): the apples-to-apples part."""
    with Timer() as t:
        sh = (dedup.shingles(dedup.token_hashes(x, "word").hashes(), dd["word_ngram"]) for x in texts)
        sig = dedup.MinHasher(dd["num_perm"], seed=seed).signatures(sh, len(texts))
        bands, rows = dedup.lsh_params(dd["lsh_threshold"], dd["num_perm"])
        res = dedup.near_duplicates(sig, bands, rows, threshold=dd["threshold"], seed=seed)
    return t, res.root == np.arange(len(texts))


def run_datasketch(texts: list[str], dd: dict, bands: int, rows: int, seed: int) -> tuple[Timer, np.ndarray]:
    """datasketch's MinHash (update_batch per document) + MinHashLSH with the same bands x rows and shingles;
    a document whose LSH query finds an earlier kept one is dropped (keep-first, like cpt)."""
    from datasketch import MinHash, MinHashLSH

    with Timer() as t:
        lsh = MinHashLSH(num_perm=dd["num_perm"], params=(bands, rows))
        keep = np.ones(len(texts), dtype=bool)
        for i, text in enumerate(texts):
            words = ["0" if w.isdigit() else w for w in dedup.tokenize(text, "word")]
            n = min(dd["word_ngram"], len(words)) or 1
            grams = [" ".join(words[j:j + n]).encode() for j in range(max(1, len(words) - n + 1))]
            mh = MinHash(num_perm=dd["num_perm"], seed=seed)
            mh.update_batch(grams)
            if lsh.query(mh):
                keep[i] = False
            else:
                lsh.insert(str(i), mh)
    return t, keep


def run_datatrove(texts: list[str], work: Path, bands: int, rows: int, ngram: int, seed: int) -> tuple[Timer, np.ndarray]:
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
    )
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SplitTokenizer(WordTokenizer):
        """Whitespace split: after datatrove's own simplify_text (punctuation gone) this is what spaCy would give,
        at a fraction of the cost."""

        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    cfg = MinhashConfig(
        n_grams=ngram, num_buckets=bands, hashes_per_bucket=rows, seed=seed,
        norm_config=TextNormConfig(lowercase=True, norm_whitespace=True, remove_punctuation=True,
                                   norm_unicode_diacritics=False, norm_numbers=True),
        hash_config=HashConfig(precision=64, hash_fc="xxhash"),
    )
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    kept: list[int] = []

    def collect(data, rank=0, world_size=1):
        for doc in data:
            kept.append(int(doc.id))
        return iter(())

    base = work / "datatrove"
    signer = MinhashDedupSignature(str(base / "sigs"), config=cfg, language=SplitTokenizer())
    # datatrove 0.10.1 passes str to xxhash, which xxhash 3.x/4.x rejects ("Strings must be encoded"): encode first
    # (still xxhash64, the fastest hash datatrove offers, so the comparison stays in datatrove's favour)
    import xxhash

    signer._hash_func = lambda text: xxhash.xxh64_intdigest(text.encode("utf-8"))
    steps = [
        LocalPipelineExecutor([docs, signer],
                              tasks=1, workers=1, logging_dir=str(base / "logs1")),
        LocalPipelineExecutor([MinhashDedupBuckets(str(base / "sigs"), str(base / "buckets"), config=cfg)],
                              tasks=bands, workers=1, logging_dir=str(base / "logs2")),
        LocalPipelineExecutor([MinhashDedupCluster(str(base / "buckets"), str(base / "remove"), config=cfg)],
                              tasks=1, workers=1, logging_dir=str(base / "logs3")),
        LocalPipelineExecutor([docs, MinhashDedupFilter(str(base / "remove")), collect],
                              tasks=1, workers=1, logging_dir=str(base / "logs4")),
    ]
    with Timer() as t:
        for ex in steps:
            ex.run()
    mask = np.zeros(len(texts), dtype=bool)
    mask[kept] = True
    return t, mask


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--sample", choices=("first", "uniform"), default="first",
                    help="first: the title-sorted head (year and commune stubs: dup-rich); uniform: seeded sample")
    ap.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "clean.json")
    args = ap.parse_args(argv)

    import logging

    logging.disable(logging.WARNING)
    try:
        from loguru import logger

        logger.remove()
    except ImportError:
        pass

    docs = load_viwiki(args.corpora, args.docs, args.sample, args.seed)
    mb_in = sum(len(d["text"].encode()) for d in docs) / 1e6
    params = {"seed": args.seed, "clean": {"decontam": {"enabled": False}}, "engine": {"workers": 1}}  # one core
    dd = {**clean.DEFAULTS["dedup"]}
    bands, rows = dedup.lsh_params(dd["lsh_threshold"], dd["num_perm"])

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t_stage, metrics, layout = run_cpt_stage(docs, work, params)
        # the documents that reached near-dedup: kept + near-duplicates, in input order
        quarantine = {r["id"]: r["reason"] for r in read_jsonl(layout.clean / "quarantine.jsonl")}
        kept_ids = {d["id"] for d in iter_docs(layout.clean, name="viwiki")}
        normalised = {}
        from cpt.data import textnorm

        for d in docs:
            i = f"viwiki/{d['id']}"
            if i in kept_ids or quarantine.get(i) == "near_duplicate":
                normalised[i] = textnorm.normalize(d["text"])
        ids = list(normalised)
        texts = [normalised[i] for i in ids]
        mb_dedup = sum(len(x.encode()) for x in texts) / 1e6
        cpt_stage_keep = np.array([i in kept_ids for i in ids])

        t_near, cpt_keep = run_cpt_neardup(texts, dd, args.seed)
        t_dt, dt_keep = run_datatrove(texts, work, bands, rows, dd["word_ngram"], args.seed)
        t_ds, ds_keep = run_datasketch(texts, dd, bands, rows, args.seed)
        # the LSH-only view (no verification), to show where the two differ
        _, cpt_lsh_keep = run_cpt_neardup(texts, {**dd, "threshold": 0.0}, args.seed)

    assert (cpt_keep == cpt_stage_keep).all(), "bench near-dedup must match the stage's decisions"
    agree = float((cpt_keep == dt_keep).mean())
    n_in, n_dedup = len(docs), len(texts)

    def rate(t: Timer, n: int, mb: float) -> dict:
        return {"cpu_s": round(t.cpu, 3), "wall_s": round(t.wall, 3), "docs_per_cpu_s": round(n / t.cpu, 1),
                "mb_per_cpu_s": round(mb / t.cpu, 3)}

    result = {
        "corpus": f"viwiki {args.sample} {n_in} docs ({mb_in:.1f} MB)",
        "machine": f"{platform.machine()} {platform.python_version()}, load avg at end "
                   f"{' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}",
        "settings": {"word_ngram": dd["word_ngram"], "num_perm": dd["num_perm"], "bands": bands, "rows": rows,
                     "threshold": dd["threshold"], "lsh_threshold": dd["lsh_threshold"]},
        "cpt_clean_stage": {**rate(t_stage, n_in, mb_in), "docs_in": n_in, "docs_out": metrics["docs_out"],
                            "near_duplicates": metrics["near_duplicates"],
                            "exact_duplicates": metrics["exact_duplicates"], "rejected": metrics["rejected"]},
        "cpt_near_dedup": {**rate(t_near, n_dedup, mb_dedup), "docs": n_dedup, "dropped": int((~cpt_keep).sum())},
        "datatrove_minhash": {**rate(t_dt, n_dedup, mb_dedup), "docs": n_dedup, "dropped": int((~dt_keep).sum())},
        "datasketch_minhash_lsh": {**rate(t_ds, n_dedup, mb_dedup), "docs": n_dedup, "dropped": int((~ds_keep).sum()),
                                   "agreement_with_cpt": round(float((ds_keep == cpt_keep).mean()), 4)},
        "speedup_per_core": {
            "cpt_clean_stage_vs_datatrove": round((n_in / t_stage.cpu) / (n_dedup / t_dt.cpu), 2),
            "cpt_near_dedup_vs_datatrove": round(t_dt.cpu / t_near.cpu, 2),
            "cpt_near_dedup_vs_datasketch": round(t_ds.cpu / t_near.cpu, 2),
        },
        "agreement": {
            "keep_drop": round(agree, 4),
            "keep_drop_cpt_lsh_only": round(float((cpt_lsh_keep == dt_keep).mean()), 4),
            "both_drop": int((~cpt_keep & ~dt_keep).sum()),
            "only_cpt_drops": int((~cpt_keep & dt_keep).sum()),
            "only_datatrove_drops": int((cpt_keep & ~dt_keep).sum()),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)

    print(f"\n{result['corpus']}; settings {result['settings']}")
    print(f"{'pipeline':<28}{'docs':>7}{'CPU s':>9}{'wall s':>9}{'docs/CPU s':>12}{'MB/CPU s':>10}{'dropped':>9}")
    for name, key, n in (("cpt clean stage (all steps)", "cpt_clean_stage", n_in),
                         ("cpt near-dedup only", "cpt_near_dedup", n_dedup),
                         ("datatrove MinHash (4 steps)", "datatrove_minhash", n_dedup),
                         ("datasketch MinHash+LSH", "datasketch_minhash_lsh", n_dedup)):
        r = result[key]
        dropped = r.get("dropped", r.get("near_duplicates"))
        print(f"{name:<28}{n:>7}{r['cpu_s']:>9.2f}{r['wall_s']:>9.2f}{r['docs_per_cpu_s']:>12.1f}"
              f"{r['mb_per_cpu_s']:>10.3f}{dropped:>9}")
    print(f"speedup per core: {result['speedup_per_core']}")
    print(f"agreement (both keep or both drop): {agree:.2%}  {result['agreement']}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
