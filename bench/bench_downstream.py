"""Benchmark: the downstream stage's tasks on one model folder: accuracy per task and seconds per task.

    .venv/bin/python bench/bench_downstream.py --model /work/cache/smollm2-hf --items 200 \
        --out bench/results/downstream_real_base.json          # SmolLM2-135M vs its published figures
    .venv/bin/python bench/bench_downstream.py --model data/base --items 40 --label tiny_demo \
        --out bench/results/downstream_tiny.json               # the demo's base: at chance, and its cost

Runs exactly what ``cpt downstream`` runs for one model (``cpt.evaluation.downstream.run_models``: lm-eval 0.4.13,
the local task YAMLs, zero-shot, ``add_bos_token=False`` + the model's prefix token), on the first ``--items``
items of each task, with ``--threads`` torch threads. Writes per task: the metric the stage reports, acc and
acc_norm, the number of items, a binomial standard error, the wall seconds of lm-eval (on a machine shared with other
jobs: see ``load_average``) and the process's CPU seconds (model load included: what an idle machine would take),
and the published figure where one exists.
An existing output file is updated (one entry per ``--label``), so the real base and the tiny demo share a file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# SmolLM2-135M (base) model card (HuggingFaceTB/SmolLM2-135M, lighteval, zero-shot, normalised log-likelihood) as the
# issue quotes them; this measures SmolLM2-135M-INSTRUCT dequantized from a 4-bit GGUF (Q4_1), with lm-eval's prompts.
PUBLISHED = {"piqa_en": {"value": 67.0, "range": [66.0, 68.0], "source": "issue 20 / SmolLM2 model card (PIQA ~66-68)"},
             "arc_easy_en": {"value": 59.0, "source": "issue 20 (ARC-Easy ~59)"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--tasks", default=None, help="comma-separated task keys (default: the stage's defaults)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--label", default="smollm2_135m_instruct_q4_1_dequantized")
    ap.add_argument("--corpora", default=str(ROOT.parent / "shared" / "corpora"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "downstream_real_base.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from cpt.evaluation import downstream
    from cpt.stages.downstream import DEFAULTS

    torch.set_num_threads(args.threads)
    keys = args.tasks.split(",") if args.tasks else list(DEFAULTS["tasks"])
    corpora = Path(args.corpora)
    if not corpora.is_dir():
        corpora = Path("/work/shared/corpora")
    started = time.perf_counter()
    out_path = Path(args.out)
    data = json.loads(out_path.read_text()) if out_path.exists() else {}
    tasks = (data.get(args.label) or {}).get("tasks") or {}
    for key in keys:  # one task at a time, the file rewritten after each (a long CPU run keeps what it finished)
        cpu0 = time.process_time()
        res = downstream.run_models({"model": Path(args.model)}, [key], corpora, limit=args.items, num_fewshot=0,
                                    batch_size=args.batch_size, device="cpu", seed=0)["model"]
        cpu = time.process_time() - cpu0  # all threads of this process, model load included: the idle-machine cost
        spec, r = downstream.TASKS[key], res[key]
        n = len(r["items"])
        value = sum(v[spec.metric] for v in r["items"].values()) / n
        tasks[key] = {"lang": spec.lang, "metric": spec.metric, "n": n, "value": round(100 * value, 1),
                      "stderr": round(100 * math.sqrt(value * (1 - value) / n), 1),
                      "acc": None if r["acc"] is None else round(100 * r["acc"], 1),
                      "acc_norm": None if r["acc_norm"] is None else round(100 * r["acc_norm"], 1),
                      "chance": round(100 * spec.chance, 1), "seconds": r["seconds"],
                      "cpu_seconds": round(cpu, 1), "load_average": round(os.getloadavg()[0], 1),
                      **({"published": PUBLISHED[key]} if key in PUBLISHED and "smollm2" in args.label else {})}
        print(f"{key:18s} {tasks[key]['value']:5.1f} (n={n}) {r['seconds']:6.1f}s", flush=True)
        data[args.label] = {
            "model": str(args.model), "threads": args.threads, "num_fewshot": 0,
            "convention": "lm-eval 0.4.13 HFLM, add_bos_token=False, every context conditioned on the model's "
                          "prefix token (cpt.evaluation.downstream.cpt_lm)",
            "tasks": tasks, "seconds_this_invocation": round(time.perf_counter() - started, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible (shared by six sessions; load average "
                       f"{os.getloadavg()[0]:.1f}), torch {torch.__version__}",
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    total = time.perf_counter() - started
    for key, t in tasks.items():
        print(f"{key:18s} {t['metric']:8s} {t['value']:5.1f} +-{t['stderr']:4.1f} (n={t['n']}) {t['seconds']:6.1f}s")
    print(f"total {total:.0f}s -> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
