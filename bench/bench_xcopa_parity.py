"""Benchmark: does lm-eval's xcopa give the same per-item decisions as cpt's hand-written XCOPA scorer?

    .venv/bin/python bench/bench_xcopa_parity.py [--models DIR ...] [--splits val,test]

The hand scorer (``cpt.evaluation.xcopa`` in the commit before it was removed: ``git show <rev>:src/cpt/evaluation/
xcopa.py``; this script carries its prompt and scoring inline so it keeps running after the removal) and lm-eval
0.4.13 (through ``cpt.evaluation.downstream.cpt_lm``: add_bos_token=False, every context conditioned on the model's
prefix token) score the same XCOPA items with the same model:

- ``same prompt``: an lm-eval task written with the hand scorer's prompt (vi connectors "vì"/"nên", zh without a
  space, first letter of the choice lower-cased): per-item decisions and the two log-likelihoods compared;
- ``lm-eval prompt``: lm-eval's own xcopa_vi / xcopa_zh prompt (vi "bởi vì"/"vì vậy", a space before every choice,
  also in Chinese), as the downstream stage runs it: how many decisions the prompt change moves.

Models: the tiny base/cpt pair of tests/test_eval.py (two different byte-level BPE vocabularies) by default, and
any HF folder given. Writes ``bench/results/downstream_xcopa_parity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

CONNECTORS = {"vi": {"cause": "vì", "effect": "nên"}, "zh": {"cause": "因为", "effect": "所以"}}
FINAL_PUNCT = ".。!！?？"

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {files}}}
output_type: multiple_choice
test_split: test
doc_to_text: "{text}"
doc_to_target: label
doc_to_choice: "{choice}"
target_delimiter: "{delim}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""


def hand_prompt(row: dict, lang: str) -> tuple[str, list[str]]:
    """The hand scorer's prompt (cpt.evaluation.xcopa.prompt, verbatim)."""
    premise = row["premise"].strip()
    if premise and premise[-1] in FINAL_PUNCT:
        premise = premise[:-1]
    sep = "" if lang == "zh" else " "
    low = [c.strip()[:1].lower() + c.strip()[1:] for c in (row["choice1"], row["choice2"])]
    return premise + sep + CONNECTORS[lang][row["question"]], [sep + c for c in low]


def hand_scores(lm, scorer, pairs):
    """cpt.evaluation.xcopa.continuation_logprobs, verbatim: context and context+continuation encoded with the
    model's own codec, prefix token + context conditions the continuation's tokens."""
    from cpt.evaluation.bpb import Window

    ctx_ids = lm.encode([c for c, _ in pairs])
    whole_ids = lm.encode([c + x for c, x in pairs])
    seqs, windows = [], []
    for i, (ctx, whole) in enumerate(zip(ctx_ids, whole_ids)):
        if len(whole) <= len(ctx):
            whole = ctx + lm.encode([pairs[i][1]])[0]
        seq = [lm.prefix_id, *whole]
        first = 1 + len(ctx)
        begin = max(0, len(seq) - scorer.max_length)
        windows.append(Window(i, begin, len(seq), max(first, begin + 1)))
        seqs.append(seq)
    return [-nll for nll, _ in scorer.score_windows(seqs, windows, desc="xcopa")]


def write_tasks(folder: Path, corpora: Path, lang: str, splits: list[str]) -> dict[str, str]:
    files = "[" + ", ".join(f'"{corpora}/xcopa/{s}.{lang}.jsonl"' for s in splits) + "]"
    c = CONNECTORS[lang]
    same_text = ("{{premise.strip()[:-1] if premise.strip()[-1] in '" + FINAL_PUNCT + "' else premise.strip()}}"
                 + ("" if lang == "zh" else " ") + "{{ {'cause': '" + c["cause"] + "', 'effect': '" + c["effect"]
                 + "'}[question] }}")
    sep = "" if lang == "zh" else " "
    same_choice = ("{{['" + sep + "' + choice1.strip()[0].lower() + choice1.strip()[1:], '" + sep
                   + "' + choice2.strip()[0].lower() + choice2.strip()[1:]]}}")
    std = {"vi": "{'cause': 'bởi vì', 'effect': 'vì vậy'}", "zh": "{'cause': '因为', 'effect': '所以'}"}[lang]
    names = {"same": f"parity_same_{lang}", "lm_eval": f"parity_lmeval_{lang}"}
    (folder / f"{names['same']}.yaml").write_text(TASK.format(name=names["same"], files=files, text=same_text,
                                                             choice=same_choice, delim=""), encoding="utf-8")
    (folder / f"{names['lm_eval']}.yaml").write_text(TASK.format(
        name=names["lm_eval"], files=files, text="{{premise.strip()[:-1]}} {{ " + std + "[question] }}",
        choice="{{[choice1[0].lower() + choice1[1:], choice2[0].lower() + choice2[1:]]}}", delim=" "),
        encoding="utf-8")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None, help="HF folders (default: the tests' tiny base/cpt pair)")
    ap.add_argument("--splits", default="val,test")
    ap.add_argument("--corpora", default=str(ROOT.parent / "shared" / "corpora"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "downstream_xcopa_parity.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    from lm_eval import simple_evaluate

    from cpt.evaluation import downstream
    from cpt.evaluation.bpb import BpbScorer
    from cpt.evaluation.models import load_model

    torch.set_num_threads(2)
    corpora = Path(args.corpora) if Path(args.corpora).is_dir() else Path("/work/shared/corpora")
    splits = args.splits.split(",")
    if args.models:
        models = {Path(m).name: Path(m) for m in args.models}
    else:
        from test_eval import _fixture_models

        d = _fixture_models(corpora)
        models = {"tiny_base": d / "base", "tiny_cpt": d / "cpt"}
    report: dict = {"splits": splits, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = {lang: write_tasks(folder, corpora, lang, splits) for lang in ("vi", "zh")}
        manager = downstream.task_manager(folder)
        for mname, path in models.items():
            lm = load_model(mname, path, device="cpu")
            scorer = BpbScorer(lm, max_length=1024, stride=768)
            hf = downstream.cpt_lm(path, batch_size=8)
            per_lang = {}
            for lang in ("vi", "zh"):
                rows = [json.loads(line) for s in splits
                        for line in (corpora / "xcopa" / f"{s}.{lang}.jsonl").read_text(encoding="utf-8").splitlines()
                        if line.strip()]
                t0 = time.perf_counter()
                pairs = [(ctx, cont) for r in rows for ctx, conts in [hand_prompt(r, lang)] for cont in conts]
                hand = hand_scores(lm, scorer, pairs)
                t_hand = time.perf_counter() - t0
                hand_pick = [int(hand[2 * i + 1] > hand[2 * i]) for i in range(len(rows))]
                out = {"items": len(rows), "hand_seconds": round(t_hand, 2)}
                for kind in ("same", "lm_eval"):
                    t0 = time.perf_counter()
                    res = simple_evaluate(model=hf, tasks=[names[lang][kind]], num_fewshot=0, log_samples=True,
                                          task_manager=manager, bootstrap_iters=0)
                    samples = sorted(res["samples"][names[lang][kind]], key=lambda s: s["doc_id"])
                    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
                    pick = [int(ll[1] > ll[0]) for ll in lls]
                    same = sum(a == b for a, b in zip(pick, hand_pick))
                    entry = {"same_decisions": same, "of": len(rows),
                             "acc": round(sum(int(p == r["label"]) for p, r in zip(pick, rows)) / len(rows), 4),
                             "seconds": round(time.perf_counter() - t0, 2)}
                    if kind == "same":
                        flat = [x for ll in lls for x in ll]
                        diffs = [abs(a - b) for a, b in zip(flat, hand)]
                        entry["max_abs_loglik_diff"] = float(max(diffs))
                        # the rest: the context's last token merges with the continuation's first, and the two
                        # split the merged text differently (lm-eval cuts the whole encoding at the context's length)
                        entry["choices_loglik_within_1e-4"] = sum(d < 1e-4 for d in diffs)
                        entry["choices"] = len(diffs)
                    out[kind] = entry
                out["hand_acc"] = round(sum(int(p == r["label"]) for p, r in zip(hand_pick, rows)) / len(rows), 4)
                per_lang[lang] = out
                print(mname, lang, json.dumps(out), flush=True)
            report["models"][mname] = {"path": str(path), **per_lang}
            del lm, hf
    total = {k: sum(v[lang][k]["same_decisions"] for v in report["models"].values() for lang in ("vi", "zh"))
             for k in ("same", "lm_eval")}
    n = sum(v[lang]["items"] for v in report["models"].values() for lang in ("vi", "zh"))
    report["summary"] = {"same_prompt_same_decisions": f"{total['same']}/{n}",
                         "lm_eval_prompt_same_decisions": f"{total['lm_eval']}/{n}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(report["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
