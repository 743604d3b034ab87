"""Benchmark: `cpt merge` on a project where `cpt eval` has run (the demo), and what it found.

    .venv/bin/python bench/bench_merge.py --root /tmp/demo-copy [--run] [--out bench/results/merge_demo.json]

``--run`` runs `cpt merge` in ``--root`` (a copy of the repo where `dvc repro eval` ran; never the repo itself) and
times it: wall seconds and the CPU seconds of the child (``resource.getrusage``, so the number holds on a busy
machine), next to eval's own wall time from the same project (metrics/timings/eval.json) as the reference. Without
``--run`` the last run's outputs are read. The result: the frontier (per a: the forgetting and gain the gate binds
on, each with its 95% interval, the decision, the gain kept per language), the chosen a, its gain kept (% of the
full cpt gain), its forgetting upper bound, the gate's decision for the merged model, the time per point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--run", action="store_true", help="run `cpt merge` in --root and time it")
    ap.add_argument("--set", action="append", default=[], help="-S override passed to `cpt merge`")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "merge_demo.json")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if root == REPO:
        print("bench_merge: --root must be a scratch copy, not the repo", file=sys.stderr)
        return 2
    run: dict = {}
    if args.run:
        cmd = ["cpt", "merge", *[x for s in args.set for x in ("-S", s)]]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if res.returncode != 0:
            print(res.stderr[-4000:], file=sys.stderr)
            return res.returncode
        run = {"command": " ".join(cmd), "wall_seconds": round(wall, 1),
               "cpu_seconds": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
               "log_tail": [line for line in res.stderr.splitlines() if " a=" in line or "chosen" in line][-12:]}
    merge = _read(root / "metrics" / "merge.json")
    if not merge:
        print(f"bench_merge: {root}/metrics/merge.json not found (run with --run)", file=sys.stderr)
        return 1
    timings = _read(root / "metrics" / "timings" / "merge.json")
    eval_timings = _read(root / "metrics" / "timings" / "eval.json")
    frontier = []
    for p in merge["points"]:
        b = p["binding"]
        frontier.append({"alpha": p["alpha"], "scored": p["scored"], "decision": p["decision"],
                         "forgetting_binding": b["forgetting"], "gain_binding": b["gain"],
                         "forgetting": p["forgetting"], "forgetting_ci95": p["forgetting_ci95"],
                         "gain": p["gain"], "gain_kept_pct": p["gain_kept"], "reason": p["reason"]})
    kept = merge.get("chosen_gain_kept") or {}
    out = {
        "what": "cpt merge on the demo (tiny base, 4 new languages, English replay): theta(a) = (1 - a) base + a cpt, "
                "new token rows from cpt",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "grid": merge["grid"], "budgets": {k: merge[k] for k in ("max_forgetting", "min_gain", "min_documents")},
        "frontier": frontier,
        "chosen": merge["chosen"], "reason": merge["reason"],
        "chosen_gain_kept_pct": kept, "chosen_gain_kept_pct_min": min(kept.values()) if kept else None,
        "chosen_forgetting_upper": merge.get("chosen_forgetting_upper"),
        "gate_for_chosen": merge.get("gate"),
        "time": {**run, "per_point_seconds": timings.get("timings"), "stage_seconds": timings.get("seconds"),
                 "eval_stage_seconds": eval_timings.get("seconds"),
                 "merge_over_eval": round(timings["seconds"] / eval_timings["seconds"], 3)
                 if timings.get("seconds") and eval_timings.get("seconds") else None},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: out[k] for k in ("chosen", "chosen_gain_kept_pct", "chosen_forgetting_upper")}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
