"""Scaling of the data stages: time and peak memory against corpus size, with 1 and 2 workers (engine: local).

A synthetic Vietnamese corpus is built from real viwiki sentences in a temporary folder (never committed):
documents of 8-60 random sentences in paragraphs, 4 files (4 ingest sources, so ingest has tasks to spread), with
2% near duplicates (one sentence swapped) and 1% exact duplicates so both dedup steps have work, plus the NTREX vi
sentences as an eval source for decontamination. Each stage runs as ``python -m cpt.cli <stage>`` in a subprocess:

- ``seconds``: wall time of the stage;
- ``peak_rss_mb``: the largest resident set of any one process of the stage (the per-worker bound; from the kernel's
  accounting of the reaped process tree, so no peak is missed between samples);
- ``peak_tree_mb``: the largest sum over the stage's processes, sampled every 0.1 s;
- ``cpu_seconds``: user + system time of all the stage's processes (on a shared box, wall time depends on the other
  jobs; the load average at the end of each stage is recorded beside it);
- ``task_cpu_s`` / ``driver_cpu_s`` / ``ideal_wall_s``: the engine's accounting (``cpt.data.engine``): CPU seconds of
  the tasks and of the driver, and the wall time the stage's engine part would take on ``workers`` idle cores
  (driver + each map's makespan of the measured task times). ``ideal_speedup_2_vs_1`` compares those: on a machine
  whose cores are taken by other jobs, it is the measurable form of the 2-worker speed-up.

``shards`` needs a tokenizer: a 4k-piece SentencePiece BPE trained here on 20k pool sentences (seconds).

    python bench/bench_scale.py --sizes 0.3 1 --workers 1 2 --out bench/results/scale.json

The projection to 100 GB fits clean's measured curve over the sizes (``projection``): the per-shard passes are
divided among all cores of N nodes; the corpus-wide steps (exact partitions, LSH band tasks, verification) are
counted at their measured seconds, linear in size, on one node (the conservative reading). ``maps`` gives each
engine map's [tasks, task CPU seconds, makespan on ``workers`` cores].
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "clean", "validate", "shards")
_SENT = re.compile(r"(?<=[.!?])\s+|\n+")


def corpora() -> Path:
    return Path(os.environ.get("CPT_CORPORA", REPO.parent / "shared" / "corpora")).resolve()


def sentence_pool() -> list[str]:
    pool = []
    with gzip.open(corpora() / "viwiki" / "viwiki.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            for s in _SENT.split(json.loads(line)["text"]):
                s = s.strip()
                if 30 <= len(s) <= 400 and not s.startswith(("=", "*", "|", "{", "[")):
                    pool.append(s)
    return pool


def make_corpus(folder: Path, gb: float, pool: list[str], files: int = 4, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    target = int(gb * 1e9 / files)
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in range(files):
        recent: list[list[str]] = []
        written = 0
        with open(folder / f"synth_{f}.jsonl", "w", encoding="utf-8") as out:
            i = 0
            while written < target:
                r = rng.random()
                if r < 0.01 and recent:
                    sents = recent[int(rng.integers(len(recent)))]
                elif r < 0.03 and recent:
                    sents = list(recent[int(rng.integers(len(recent)))])
                    sents[int(rng.integers(len(sents)))] = pool[int(rng.integers(len(pool)))]
                else:
                    sents = [pool[k] for k in rng.integers(0, len(pool), size=int(rng.integers(8, 60)))]
                    recent = (recent + [sents])[-500:]
                paras = [" ".join(sents[k:k + 5]) for k in range(0, len(sents), 5)]
                line = json.dumps({"id": f"{f}-{i}", "text": "\n".join(paras)}, ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                i += 1
            n += i
    return n


def make_tokenizer(folder: Path, pool: list[str]) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from cpt.training import tiny

    folder.mkdir(parents=True, exist_ok=True)
    tiny.train_tokenizer(pool[:20000], folder / "tokenizer.model", vocab_size=4096, seed=0)
    tiny.write_hf_tokenizer(folder / "tokenizer.model", folder)


def write_params(root: Path, corpus: Path, tok: Path) -> Path:
    src = [{"name": f"synth_{f}", "path": f"synth_{f}.jsonl", "lang": "vi", "domain": "new", "role": "train"}
           for f in range(4)]
    src.append({"name": "ntrex_vi", "path": str(corpora() / "ntrex128" / "newstest2019-ref.vie.txt"),
                "lang": "vi", "domain": "new", "role": "eval", "unit": "line"})
    params = {"seed": 1, "ingest": {"corpus_dir": str(corpus), "sources": src},
              "clean": {"filters": {"vi": {"min_chars": 100}}}, "validate": {},
              "shards": {"tokenizer": str(tok), "block_size": 256}, "tracking": {"enabled": False}}
    path = root / "params.yaml"
    path.write_text(json.dumps(params, ensure_ascii=False), encoding="utf-8")  # JSON is YAML
    return path


_WRAP = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
         "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
         "print(r.ru_maxrss, r.ru_utime + r.ru_stime, file=sys.stderr); sys.exit(rc)")


def run_stage(root: Path, params: Path, stage: str, workers: int) -> dict:
    import psutil

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CPT_TRACKING": "0", "CPT_PROGRESS": "0",
           "OMP_WAIT_POLICY": "PASSIVE"}
    if stage == "shards":  # one tokenizer thread per worker: with workers=1 the stage would otherwise tokenise on
        env["RAYON_NUM_THREADS"] = "1"  # every core in its own process, and 1 vs 2 workers would not be 1 vs 2 cores
    cmd = [sys.executable, "-c", _WRAP, sys.executable, "-m", "cpt.cli", stage, "-p", str(params), "--root",
           str(root), "-S", f"engine.workers={workers}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    peak_tree = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [ps] + ps.children(recursive=True)
            peak_tree = max(peak_tree, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed:\n{err[-3000:]}")
    peak_kb, cpu = err.strip().splitlines()[-1].split()
    return {"seconds": round(seconds, 1), "cpu_seconds": round(float(cpu), 1), "peak_rss_mb": round(int(peak_kb) / 1024),
            "peak_tree_mb": round(peak_tree / 2**20), "load_avg_1m": round(os.getloadavg()[0], 1)}


def _slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` (one point: through the origin)."""
    if len(xs) < 2:
        return 0.0, ys[0] / xs[0]
    b, a = np.polyfit(np.asarray(xs), np.asarray(ys), 1)
    return float(a), float(b)


def projection(rows: list[dict], gb_target: float = 100.0) -> dict:
    """Hours to clean ``gb_target`` GB on N nodes of C cores, from the measured curve of the clean stage.

    Fitted over every measured size (least squares, 1-worker rows: no pool overhead in the CPU figures):
    ``core_seconds_per_gb``, the CPU of the per-shard passes, divided among all cores of all nodes; and
    ``corpus_wide_seconds_per_gb``, the wall of the corpus-wide steps (exact partitions, LSH bands, verification and
    components), counted as if they ran on one node at their measured speed (the conservative reading: the band
    and partition tasks do spread over nodes)."""
    cl = sorted((r for r in rows if r["stage"] == "clean" and r["workers"] == min(x["workers"] for x in rows)),
                key=lambda r: r["gb"])
    if not cl:
        return {}
    gbs = [r["gb"] for r in cl]
    serial = [sum((r.get("metrics", {}).get("timings") or {}).get(k, 0) for k in ("exact_dedup", "lsh")) for r in cl]
    par = [r["cpu_seconds"] - s for r, s in zip(cl, serial)]
    a_p, b_p = _slope(gbs, par)
    a_s, b_s = _slope(gbs, serial)
    out = {}
    for nodes, cores in ((1, 2), (1, 16), (4, 16), (16, 16), (64, 16)):
        sec = (a_p + b_p * gb_target) / (nodes * cores) + max(0.0, a_s + b_s * gb_target)
        out[f"{nodes}x{cores}"] = round(sec / 3600, 2)
    return {"gb": gb_target, "fitted_on_gb": gbs, "hours_by_nodes_x_cores": out,
            "core_seconds_per_gb": round(b_p, 1), "corpus_wide_seconds_per_gb": round(b_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--stages", nargs="+", default=list(STAGES))
    ap.add_argument("--tmp", default=None, help="scratch folder (default: a new temporary one, removed after)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = ap.parse_args()
    scratch = Path(args.tmp or tempfile.mkdtemp(prefix="cpt-scale-"))
    rows: list[dict] = []
    try:
        pool = sentence_pool()
        tok = scratch / "tokenizer"
        if "shards" in args.stages and not (tok / "tokenizer.json").exists():
            make_tokenizer(tok, pool)
        for gb in args.sizes:
            corpus = scratch / f"corpus_{gb}"
            if not corpus.exists():
                t = time.perf_counter()
                n = make_corpus(corpus, gb, pool)
                print(f"corpus {gb} GB: {n} docs in {time.perf_counter() - t:.0f}s", flush=True)
            for w in args.workers:
                root = scratch / f"proj_{gb}_{w}"
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir()
                params = write_params(root, corpus, tok)
                for stage in args.stages:
                    r = run_stage(root, params, stage, w)
                    # results in metrics/<stage>.json, this run's timings and engine CPU in metrics/timings/ (cpt.ops.timings)
                    metrics = {}
                    for mfile in (root / "metrics" / f"{stage}.json", root / "metrics" / "timings" / f"{stage}.json"):
                        metrics.update(json.loads(mfile.read_text()) if mfile.exists() else {})
                    row = {"gb": gb, "stage": stage, "workers": w, **r,
                           "input_mb": round(sum(f.stat().st_size for f in corpus.glob("*.jsonl")) / 1e6)}
                    if "engine" in metrics:  # CPU accounting of the stage's engine (see cpt.data.engine.Engine)
                        e = metrics["engine"]
                        row.update(task_cpu_s=e["task_cpu_s"], driver_cpu_s=e["driver_cpu_s"],
                                   ideal_wall_s=e["ideal_wall_s"],
                                   maps={m["name"]: [m["tasks"], m["task_cpu_s"], m["makespan_s"]] for m in e["maps"]})
                    if stage == "clean":
                        row["metrics"] = {k: metrics.get(k) for k in ("docs_in", "docs_out", "exact_duplicates",
                                                                        "near_duplicates", "timings")}
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "metrics"}), flush=True)
                shutil.rmtree(root, ignore_errors=True)
            if args.tmp is None:
                shutil.rmtree(corpus, ignore_errors=True)
    finally:
        if args.tmp is None:
            shutil.rmtree(scratch, ignore_errors=True)
    speedups, ideal = {}, {}
    for gb in args.sizes:
        for stage in args.stages:
            sel = {r["workers"]: r for r in rows if r["gb"] == gb and r["stage"] == stage}
            if 1 in sel and 2 in sel:
                speedups[f"{gb}GB/{stage}"] = round(sel[1]["seconds"] / sel[2]["seconds"], 2)
                if "ideal_wall_s" in sel[2]:
                    ideal[f"{gb}GB/{stage}"] = round(sel[1]["ideal_wall_s"] / sel[2]["ideal_wall_s"], 2)
    peak = {stage: {f"{gb}GB": max(r["peak_rss_mb"] for r in rows if r["stage"] == stage and r["gb"] == gb)
                    for gb in args.sizes if any(r["stage"] == stage and r["gb"] == gb for r in rows)}
            for stage in args.stages}
    result = {"rows": rows, "speedup_2_vs_1": speedups, "ideal_speedup_2_vs_1": ideal,
              "peak_rss_mb_per_process": peak, "projection": projection(rows) if rows else {},
              "machine": {"cores": os.cpu_count(), "load_avg_at_end": os.getloadavg()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("speedup_2_vs_1", "ideal_speedup_2_vs_1", "peak_rss_mb_per_process",
                                             "projection")}, indent=1))


if __name__ == "__main__":
    main()
