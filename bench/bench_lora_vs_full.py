"""train.method full vs lora on the same data and steps, on CPU: gain and forgetting (with the eval stage's 95%
intervals), tokens/s and peak RSS of `cpt train`.

    python bench/bench_lora_vs_full.py --project /tmp/demo --label demo [-S train.steps=40 ...]

``--project``: a project folder whose pipeline has run up to ``shards`` (data/base, data/tokenizer, data/shards,
data/clean, params.yaml, .dvc/config). Each method runs in its own copy (``<project>-<method>``): ``cpt train`` under
``/usr/bin/time -v`` (peak RSS of the process), then ``cpt eval``. The result is appended to
``bench/results/lora_vs_full.json`` under ``--label``. Tokens/s is a ratio between the two methods of the same run,
on a shared 2-core machine: read it as "lora vs full", not as an absolute speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of ``cmd``."""
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return time.time() - t0, rss


def one(project: Path, method: str, sets: list[str], env: dict) -> dict:
    dst = project.parent / f"{project.name}-{method}"
    shutil.rmtree(dst, ignore_errors=True)
    ignore = shutil.ignore_patterns("checkpoints", "models", "mlflow*", ".tmp-*")
    shutil.copytree(project, dst, ignore=ignore, symlinks=True)
    overrides = [a for s in [f"train.method={method}", *sets] for a in ("-S", s)]
    train_s, rss = run(["cpt", "train", *overrides], dst, env)
    eval_overrides = [a for s in sets if s.startswith("eval.") for a in ("-S", s)]
    eval_s, _ = run(["cpt", "eval", *eval_overrides], dst, env)
    train = json.loads((dst / "metrics" / "train.json").read_text())
    timings = json.loads((dst / "metrics" / "timings" / "train.json").read_text())
    ev = json.loads((dst / "metrics" / "eval.json").read_text())
    per_source = {name: {k: s.get(k) for k in ("lang", "domain", "gain", "gain_ci95", "forgetting", "forgetting_ci95")
                         if k in s} for name, s in ev.get("sources", {}).items()}
    return {
        "method": method, "train_wall_s": round(train_s, 1), "eval_wall_s": round(eval_s, 1),
        "peak_rss_gib": round(rss / 2**20, 3),
        "tokens_per_s": timings.get("tokens_per_s"), "train_seconds": timings.get("train_seconds"),
        "tokens": train.get("tokens"), "steps": train.get("steps"), "adapter": train.get("adapter"),
        "train_bpb": train.get("final_bpb"),
        "gain": ev.get("gain"), "gain_ci95": ev.get("gain_ci95"),
        "forgetting": ev.get("forgetting"), "forgetting_ci95": ev.get("forgetting_ci95"),
        "per_source": per_source,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", required=True, type=Path)
    ap.add_argument("--label", required=True)
    ap.add_argument("--methods", nargs="+", default=["full", "lora"])
    ap.add_argument("-S", "--set", action="append", default=[], dest="sets", help="param override (both methods)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora_vs_full.json")
    args = ap.parse_args()
    env = {**os.environ, "CPT_TRACKING": "0", "CPT_PROGRESS": "0"}
    rows = {m: one(args.project.resolve(), m, args.sets, env) for m in args.methods}
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    out[args.label] = {"overrides": args.sets, "machine": f"{os.cpu_count()} CPUs (shared), torch CPU fp32",
                       "runs": rows}
    if "full" in rows and "lora" in rows:
        f, lo = rows["full"], rows["lora"]
        out[args.label]["lora_over_full"] = {
            "tokens_per_s": lo["tokens_per_s"] / f["tokens_per_s"] if f["tokens_per_s"] else None,
            "peak_rss": lo["peak_rss_gib"] / f["peak_rss_gib"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out[args.label], indent=1)[:4000])


if __name__ == "__main__":
    main()
