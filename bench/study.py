"""The recipe study: naive continual pretraining vs cpt's recipe, same data and compute, scored by `cpt eval`.

    naive     no replay, constant LR at the peak (no warmup, no decay), random init of the new embedding rows
    cpt_r05   re-warm + cosine decay to min_lr, replay 5% old-language data, sub-token-mean init
    cpt_r25   the same with 25% replay (the language-shift setting in Ibrahim et al. 2024)

Every run trains from the same data/base, data/tokenizer and data/shards (symlinked from --root into its own run
folder, so the runs never overwrite each other or the project's data/models/cpt) for the same number of steps and
micro-batches, then `cpt eval` scores base vs that run's model on the same documents. The table gives, per run,
the gain (bpb saved on the new languages) and forgetting (bpb lost on the old one), pooled over sources (summed NLL /
summed bytes), and checks the goal of issue 6: keep >= 95% of the naive run's gain with <= 1/3 of its forgetting.

    .venv/bin/python bench/study.py --root . --steps 200
    .venv/bin/python bench/study.py --runs naive,cpt_r25 -S train.micro_batch=16 -S eval.max_bytes=null

The upstream stages must have run in --root (`dvc repro shards` or `make demo`). Nothing here is a test: it is the
experiment whose table goes into the report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cpt.params import load_params  # noqa: E402

LN2 = math.log(2.0)
RUNS: dict[str, dict[str, object]] = {
    "naive": {"train.replay_ratio": 0.0, "train.schedule": "constant", "train.warmup": 0.0,
              "train.embed_init": "random"},
    "naive_mean": {"train.replay_ratio": 0.0, "train.schedule": "constant", "train.warmup": 0.0,
                   "train.embed_init": "mean"},
    "cpt_r05": {"train.replay_ratio": 0.05, "train.schedule": "cosine", "train.warmup": 0.05,
                "train.embed_init": "subtoken_mean"},
    "cpt_r25": {"train.replay_ratio": 0.25, "train.schedule": "cosine", "train.warmup": 0.05,
                "train.embed_init": "subtoken_mean"},
}
SHARED = ("base", "tokenizer", "shards", "clean")


def run_root(out: Path, name: str, root: Path) -> Path:
    """<out>/<name>/ with the shared upstream artifacts linked in; its own data/models, checkpoints, metrics."""
    rr = out / name
    (rr / "data").mkdir(parents=True, exist_ok=True)
    for part in SHARED:
        link, target = rr / "data" / part, (root / "data" / part).resolve()
        if not target.exists():
            sys.exit(f"study: {target} missing; run the pipeline up to `shards` in {root} first")
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return rr


def cpt(verb: str, rr: Path, params: Path, overrides: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "cpt.cli", verb, "--root", str(rr), "-p", str(params)]
    for o in overrides:
        cmd += ["-S", o]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CPT_PROGRESS": "0"}
    started = time.perf_counter()
    with log.open("a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if rc:
        sys.exit(f"study: `cpt {verb}` failed for {rr.name} (rc {rc}); see {log}")
    return time.perf_counter() - started


def pooled(m: dict, model: str, domain: str) -> float:
    rows = [r for r in m[model].values() if isinstance(r, dict) and r.get("domain") == domain]
    if not rows:
        return float("nan")
    return sum(r["nll_nats"] for r in rows) / LN2 / sum(r["bytes"] for r in rows)


def summarise(name: str, m: dict, overrides: dict, seconds: float) -> dict:
    gain = pooled(m, "base", "new") - pooled(m, "cpt", "new")
    forgetting = pooled(m, "cpt", "old") - pooled(m, "base", "old")
    return {"run": name, "overrides": overrides, "gain": gain, "forgetting": forgetting,
            "gain_by_lang": m.get("gain", {}), "forgetting_by_lang": m.get("forgetting", {}),
            "xcopa": {k: v.get("cpt") for k, v in m.get("xcopa", {}).items()}, "seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    naive = next((r for r in rows if r["run"] == "naive"), None)
    langs_g = sorted({k for r in rows for k in r["gain_by_lang"]})
    langs_f = sorted({k for r in rows for k in r["forgetting_by_lang"]})
    head = (["run", "replay", "schedule", "init", "gain (new)", "forgetting (old)"]
            + [f"gain {lang}" for lang in langs_g] + [f"forg. {lang}" for lang in langs_f]
            + ["gain kept vs naive", "forgetting vs naive", "goal", "xcopa vi (cpt)"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        o = r["overrides"]
        kept = fr = "-"
        goal = "-"
        if naive and r is not naive and naive["gain"] > 0:
            kept_v = r["gain"] / naive["gain"]
            kept = f"{100 * kept_v:.0f}%"
            if naive["forgetting"] > 0:
                fr_v = r["forgetting"] / naive["forgetting"]
                fr = f"{100 * fr_v:.0f}%"
                goal = "yes" if kept_v >= 0.95 and fr_v <= 1 / 3 else "no"
            else:
                fr = "naive did not forget"
        cells = [r["run"], str(o.get("train.replay_ratio")), str(o.get("train.schedule")), str(o.get("train.embed_init")),
                 f"{r['gain']:+.4f}", f"{r['forgetting']:+.4f}"]
        cells += [f"{r['gain_by_lang'].get(lang, float('nan')):+.4f}" for lang in langs_g]
        cells += [f"{r['forgetting_by_lang'].get(lang, float('nan')):+.4f}" for lang in langs_f]
        cells += [kept, fr, goal, str(r["xcopa"].get("vi", "-"))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(REPO), help="project root whose data/{base,tokenizer,shards,clean} to use")
    ap.add_argument("--params", default=None, help="params file (default: <root>/params.yaml)")
    ap.add_argument("--out", default=None, help="folder for the run roots and the table (default: <root>/data/study)")
    ap.add_argument("--runs", default="naive,cpt_r05,cpt_r25", help=f"comma-separated, from {sorted(RUNS)}")
    ap.add_argument("--steps", type=int, default=None, help="train.steps for every run (same compute)")
    ap.add_argument("--lr", type=float, default=None, help="peak LR for every run (naive holds it constant)")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="extra override for every run")
    ap.add_argument("--eval-only", action="store_true", help="re-score existing run models, no training")
    args = ap.parse_args(argv)

    root = Path(args.root).resolve()
    params_path = Path(args.params).resolve() if args.params else root / "params.yaml"
    out = Path(args.out).resolve() if args.out else root / "data" / "study"  # git-ignored
    params = load_params(params_path)
    corpus = Path(params.get("ingest", {}).get("corpus_dir", "../shared/corpora"))
    corpus = corpus if corpus.is_absolute() else (root / corpus).resolve()
    common = [f"ingest.corpus_dir={corpus}", "train.resume=false", *args.overrides]
    if args.steps:
        common.append(f"train.steps={args.steps}")
    if args.lr:
        common.append(f"train.lr={args.lr}")

    rows = []
    for name in [r.strip() for r in args.runs.split(",") if r.strip()]:
        if name not in RUNS:
            ap.error(f"unknown run {name!r}; known: {sorted(RUNS)}")
        rr = run_root(out, name, root)
        log = rr / "study.log"
        ov = [f"{k}={v}" for k, v in RUNS[name].items()]
        seconds = 0.0
        if not args.eval_only:
            seconds += cpt("train", rr, params_path, common + ov, log)
        seconds += cpt("eval", rr, params_path, common + ov, log)
        m = json.loads((rr / "metrics" / "eval.json").read_text(encoding="utf-8"))
        rows.append(summarise(name, m, RUNS[name], seconds))
        print(f"{name}: gain {rows[-1]['gain']:+.4f} bpb, forgetting {rows[-1]['forgetting']:+.4f} bpb "
              f"({seconds:.0f}s)", flush=True)
    md = table(rows)
    print()
    print(md)
    (out / "study.json").write_text(json.dumps({"common": common, "runs": rows}, indent=2, ensure_ascii=False))
    (out / "study.md").write_text("# cpt recipe study\n\nCommon overrides: `" + " ".join(common) + "`\n\n" + md + "\n")
    print(f"\nwritten: {out / 'study.md'}, {out / 'study.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
