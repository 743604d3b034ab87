"""Peak RSS of `cpt train` per process: one process vs each of 2 FSDP2 ranks (gloo, CPU), same global batch.

The issue's bar: on a ~150M-parameter Llama each of 2 ranks peaks at most 0.65x the single-process peak RSS. With
the meta-device build, per-rank slices of the base and sharded DCP checkpoints, a rank holds half the fp32 weights,
gradients and Adam moments and half the activations; what it cannot halve is the interpreter with torch and
transformers imported (~430 MB here) and FSDP2's gathered root (embeddings + head) during the step.

A synthetic project (random Llama saved as safetensors, 2,000 added tokens with random sub-token ids, random token
shards) is built once under --work; each run is the real CLI (`python -m cpt.cli train`, under torchrun for 2
ranks) in a fresh interpreter that reports its own ru_maxrss. Not a timed test: run it by hand.

    python bench/bench_train_memory.py                    # ~150M params, 2 ranks vs 1; a few minutes on 2 cores
    python bench/bench_train_memory.py --src /path/src    # the same with another checkout's cpt (e.g. before)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUNNER = textwrap.dedent(
    """
    import os, resource, sys
    from cpt.cli import main
    rc = main(sys.argv[1:])
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(os.environ["RSS_DIR"], f"rss_{rank}.txt"), "w") as fh:
        fh.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    sys.exit(rc)
    """
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--ffn", type=int, default=2560)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000, help="base vocabulary")
    p.add_argument("--added", type=int, default=2000, help="new tokens")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step (micro_batch x ranks)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", default="/tmp/cpt-bench-train-memory")
    p.add_argument("--src", default=str(REPO / "src"), help="the cpt to measure (a checkout's src/)")
    p.add_argument("--glibc-default", action="store_true",
                   help="keep glibc's adaptive mmap threshold (freed tensors then stay in RSS)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_memory.json"))
    return p.parse_args(argv)


def build_project(args, root: Path) -> int:
    """data/base, data/tokenizer/new_tokens.json and data/shards for a random Llama; returns its parameter count."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = root / "data" / "base"
    if not (base / "model.safetensors").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.ffn,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.heads, max_position_embeddings=max(512, args.seq + 1),
                          tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(base)
    rng = np.random.default_rng(0)
    vocab = args.vocab + args.added
    tok = root / "data" / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    added = [{"id": args.vocab + i, "piece": f"t{i}", "text": f"t{i}",
              "base_ids": rng.integers(3, args.vocab, size=3).tolist()} for i in range(args.added)]
    (tok / "new_tokens.json").write_text(json.dumps({"base_vocab": args.vocab, "vocab": vocab, "added": added}))
    block = args.seq + 1
    splits = {}
    for name, blocks in (("new/train", 64), ("old/train", 64), ("new/val", 4), ("old/val", 4)):
        ids = rng.integers(3, vocab if name.startswith("new") else args.vocab, size=blocks * block)
        path = root / "data" / "shards" / f"{name}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        ids.astype("<u2").tofile(path)
        splits[name] = {"tokens": int(ids.size), "blocks": blocks, "bytes": int(ids.size) * 3}
    (root / "data" / "shards" / "meta.json").write_text(json.dumps(
        {"dtype": "uint16", "block_size": block, "vocab_size": vocab, "eos_id": 2, "splits": splits}))
    config = json.loads((base / "config.json").read_text())
    d, f, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return L * (4 * d * d + 3 * d * f + 2 * d) + 2 * args.vocab * d + d


def run(args, root: Path, ranks: int) -> list[int]:
    import yaml

    micro = args.global_batch // ranks
    params = {"seed": 0, "train": {"steps": args.steps, "micro_batch": micro, "grad_accum": 1,
                                   "eval_interval": args.steps, "eval_blocks": 2, "ckpt_interval": args.steps,
                                   "keep_checkpoints": 1, "resume": False, "parallel": "fsdp", "log_interval": 1}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    rss_dir = root / f"rss_{ranks}"
    rss_dir.mkdir(exist_ok=True)
    for f in rss_dir.glob("rss_*.txt"):
        f.unlink()
    runner = root / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": args.src, "RSS_DIR": str(rss_dir), "OMP_NUM_THREADS": "1",
           "CPT_TRACKING": "0", "CPT_PROGRESS": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    if not args.glibc_default:
        # glibc raises its mmap threshold after the first large free, so later 0.1-30 MB tensors come from the heap
        # and freed ones stay in RSS: peak RSS then counts the calibration's and the probe's dead logits as if
        # live (measured: 4.3 GB vs 2.3 GB for the same rank). A fixed threshold returns them, in both runs.
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [str(runner), "train", "-p", str(root / "params.yaml"), "--root", str(root)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return [int((rss_dir / f"rss_{r}.txt").read_text()) for r in range(ranks)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = Path(args.work)
    n_params = build_project(args, root)
    single = run(args, root, 1)[0]
    multi = run(args, root, args.ranks)
    result = {"params": n_params, "src": args.src, "seq": args.seq, "global_batch": args.global_batch,
              "malloc_fixed_threshold": not args.glibc_default,
              "steps": args.steps, "single_peak_rss_mb": single / 2**20,
              "rank_peak_rss_mb": [r / 2**20 for r in multi], "max_ratio": max(multi) / single}
    print(f"{n_params / 1e6:.0f}M-parameter Llama, {args.global_batch} x {args.seq} tokens per step, src {args.src}")
    print("| run | peak RSS MB | vs 1 process |\n|---|---:|---:|")
    print(f"| 1 process | {single / 2**20:,.0f} | 1.00 |")
    for r, v in enumerate(multi):
        print(f"| {args.ranks} ranks, rank {r} | {v / 2**20:,.0f} | {v / single:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
