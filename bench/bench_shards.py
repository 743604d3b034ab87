"""Benchmark: the whole `shards` stage (read data/clean JSONL, split, tokenise, pack, write .bin + heldout + meta)
vs raw `tokenizers` ``encode_batch`` on the same texts already in memory, in the same run. Goal: >= 0.9x.

    .venv/bin/python bench/bench_shards.py [--vi-docs 2000] [--repeats 3] [--tokenizer DIR] [--out bench/results/shards.json]

The text is the demo's training text (params.yaml ingest): viwiki (first N articles), CMRC zh, JSQuAD ja, KAIST ko
and the 29 English Gutenberg books, written as data/clean records in a temporary project. The tokenizer is
``--tokenizer`` (e.g. data/tokenizer after `dvc repro tokenizer`) or, by default, an 8k SentencePiece BPE Llama
tokenizer trained here on English + Vietnamese lines (the same folder format as the extended tokenizer).

Both sides count the same thing: the text tokens of every document (BOS/EOS excluded), so tokens/s compare work done
on identical input. The reference gets every text of a domain in ONE ``encode_batch`` call (its best case: no
batching, no I/O); the stage pays for JSON parsing, the split, packing, the files and the fsyncs. Runs alternate
(reference, stage, reference, ...) and the best of each is kept, so a busy machine hurts both alike; CPU seconds
(``resource.getrusage``, this process) are reported too.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("CPT_PROGRESS", "0")

from cpt.stages import shards  # noqa: E402
from cpt.training import tiny  # noqa: E402
from cpt.io import write_json, write_jsonl  # noqa: E402
from cpt.layout import Layout  # noqa: E402
from cpt.data.packing import load_tokenizer, tokenizers_parallelism  # noqa: E402
from cpt.data.records import SourceInfo, iter_docs, write_manifest  # noqa: E402

SOURCES = [  # (name, file, lang, domain, max docs or None) as in params.yaml ingest
    ("viwiki", "viwiki/viwiki.jsonl.gz", "vi", "new", 2000),
    ("zh_cmrc", "zh_cmrc2018_contexts/cmrc2018_contexts.jsonl", "zh", "new", 400),
    ("ja_jsquad", "ja_jsquad_contexts/jsquad_v1.3_contexts.jsonl", "ja", "new", 400),
    ("ko_kaist", "ko_ud_kaist/ko_kaist_dev_test_docs.jsonl", "ko", "new", None),
    ("en_gutenberg", "en_gutenberg/en_gutenberg_books.jsonl.gz", "en", "old", None),
]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def read(path: Path, n: int | None):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if n is not None and i >= n:
                break
            yield json.loads(line)


def make_project(root: Path, corpora: Path, vi_docs: int) -> Layout:
    layout = Layout(root)
    infos = []
    for name, rel, lang, domain, n in SOURCES:
        n = vi_docs if name == "viwiki" else n
        rows = [{"id": f"{name}/{r.get('id', i)}", "source": name, "lang": lang, "domain": domain, "role": "train",
                 "text": r["text"].strip()} for i, r in enumerate(read(corpora / rel, n))]
        write_jsonl(layout.clean / f"{name}.jsonl", rows)
        infos.append(SourceInfo(name, lang, domain, "train", f"{name}.jsonl", len(rows)))
    write_manifest(layout.clean, infos)
    return layout


def make_tokenizer(folder: Path, layout: Layout) -> Path:
    lines = []
    for domain, cap in (("old", 60_000), ("new", 60_000)):
        got = [ln for d in iter_docs(layout.clean, role="train", domain=domain) for ln in d["text"].split("\n")
               if ln.strip()]
        lines += got[:cap]
    tiny.train_tokenizer(lines, folder / "tokenizer.model", vocab_size=8000, seed=0)
    tiny.write_hf_tokenizer(folder / "tokenizer.model", folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpora", default=str(REPO.parent / "shared" / "corpora"))
    ap.add_argument("--vi-docs", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer folder (default: train an 8k one here)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "shards.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        layout = make_project(Path(tmp) / "proj", Path(args.corpora), args.vi_docs)
        tok_dir = Path(args.tokenizer) if args.tokenizer else make_tokenizer(Path(tmp) / "tok", layout)
        tok = load_tokenizer(tok_dir)
        texts = {d: [r["text"] for r in iter_docs(layout.clean, role="train", domain=d)] for d in ("new", "old")}
        chars = sum(len(t) for ts in texts.values() for t in ts)
        params = {"seed": 1234, "shards": {"tokenizer": str(tok_dir), "block_size": args.block_size}}

        ref, ref_fast, stage = [], [], []
        ntok = None
        for _ in range(args.repeats):
            with tokenizers_parallelism(True):
                t0, c0 = time.perf_counter(), cpu_seconds()
                n = sum(len(e.ids) for ts in texts.values() for e in tok.encode_batch(ts, add_special_tokens=False))
                ref.append((time.perf_counter() - t0, cpu_seconds() - c0))
                t0, c0 = time.perf_counter(), cpu_seconds()
                for ts in texts.values():
                    tok.encode_batch_fast(ts, add_special_tokens=False)
                ref_fast.append((time.perf_counter() - t0, cpu_seconds() - c0))
            ntok = n
            t0, c0 = time.perf_counter(), cpu_seconds()
            metrics = shards.run(params, layout)
            stage.append((time.perf_counter() - t0, cpu_seconds() - c0))
        meta = json.loads((layout.shards / "meta.json").read_text())
        packed = sum(s["tokens"] + s["tail_tokens"] for s in meta["splits"].values())
        docs = sum(s["docs"] for s in meta["splits"].values())
        specials = packed - ntok  # BOS + EOS per document
        assert specials in (docs, 2 * docs) or abs(specials - 2 * docs) <= 2, (packed, ntok, docs)

    best = {k: min(v, key=lambda x: x[0]) for k, v in (("ref", ref), ("ref_fast", ref_fast), ("stage", stage))}
    rate = {k: ntok / v[0] for k, v in best.items()}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    result = {
        "benchmark": "shards stage (read+split+tokenise+pack+write) vs raw tokenizers encode_batch on the same texts",
        "text_chars": chars,
        "text_tokens": ntok,
        "documents": docs,
        "tokenizer_vocab": meta["vocab_size"],
        "tokenizer": "--tokenizer " + str(args.tokenizer) if args.tokenizer else "8k SentencePiece BPE (en+vi)",
        "block_size": args.block_size,
        "repeats": args.repeats,
        "wall_seconds": {k: [round(x[0], 3) for x in v] for k, v in (("ref", ref), ("ref_fast", ref_fast),
                                                                     ("stage", stage))},
        "cpu_seconds": {k: [round(x[1], 3) for x in v] for k, v in (("ref", ref), ("ref_fast", ref_fast),
                                                                    ("stage", stage))},
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "ratio_vs_encode_batch": round(rate["stage"] / rate["ref"], 3),
        "ratio_vs_encode_batch_fast": round(rate["stage"] / rate["ref_fast"], 3),
        "goal": ">= 0.9x encode_batch",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "commit": commit,
        "stage_metrics": {k: metrics[k] for k in ("tokens", "blocks", "docs", "tail_tokens_dropped")},
    }
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("text_tokens", "tokens_per_s", "ratio_vs_encode_batch",
                                             "ratio_vs_encode_batch_fast", "wall_seconds", "machine")}, indent=1))


if __name__ == "__main__":
    main()
