"""The training verbs that are not pipeline stages: ``cpt train --plan`` (memory and step time before a run) and
``cpt export`` (an HF folder from any DCP checkpoint, e.g. step 4000 of a run still going). They write no metrics
file and touch no DVC output unless told to."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cpt.errors import ConfigError
from cpt.layout import Layout


def add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--plan (print the per-GPU memory and step time; train nothing)")
    g.add_argument("--plan", action="store_true", help="print the plan for this config and exit")
    g.add_argument("--model", default=None,
                   help="a preset (mistral-7b, llama-2-7b, tinyllama-1.1b), a config.json or a model folder "
                        "(default: data/base)")
    g.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")), help="ranks (GPUs)")
    g.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU (default 80)")
    g.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the shards' block - 1)")
    g.add_argument("--vocab", type=int, default=None,
                   help="vocabulary after the extension (default: data/tokenizer/new_tokens.json); padded to 64")
    g.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for the step time (default 0.4)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 peak per GPU (default: train.peak_tflops, else 989, an H100/H200 SXM)")


def run_plan(args: argparse.Namespace, cfg: dict, layout: Layout) -> dict:
    """``cfg``: the train stage's config (params' train section over its defaults)."""
    from cpt.training.embeddings import padded
    from cpt.training.plan import load_shape, plan

    vocab = args.vocab
    if vocab is None and (layout.tokenizer / "new_tokens.json").exists():
        vocab = int(json.loads((layout.tokenizer / "new_tokens.json").read_text(encoding="utf-8"))["vocab"])
    seq = args.seq
    if seq is None:
        meta = layout.shards / "meta.json"
        seq = int(json.loads(meta.read_text(encoding="utf-8"))["block_size"]) - 1 if meta.exists() else 2048
    if args.world_size < 1 or seq < 1 or not 0 < args.mfu <= 1:
        raise ConfigError("--world-size and --seq must be >= 1 and --mfu in (0, 1]")
    shape = load_shape(args.model or str(layout.base), layout.root, padded(vocab, 64) if vocab else None)
    text, numbers = plan(shape, world_size=args.world_size, micro_batch=cfg["micro_batch"], seq=seq,
                         grad_accum=cfg["grad_accum"], parallel=cfg["parallel"], gpu_gib=args.gpu_gib,
                         activation_checkpointing=bool(cfg["activation_checkpointing"]),
                         loss_chunk=cfg["loss_chunk"], mfu=args.mfu,
                         peak_tflops=args.peak_tflops or cfg["peak_tflops"] or 989.0,
                         method=cfg.get("method", "full"), lora_rank=cfg.get("lora_rank", 16),
                         lora_dropout=cfg.get("lora_dropout", 0.05),
                         lora_targets=cfg.get("lora_targets", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"]))
    print(text)
    return numbers


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write an HF folder from a training checkpoint (not a pipeline stage)",
                       description="Write an HF folder (safetensors shards + index, config, tokenizer) from a DCP "
                                   "checkpoint of `cpt train`, of any world size, in one process, without reading "
                                   "the optimizer state.")
    p.add_argument("--checkpoint", default=None, help="a step_<N> folder (default: the newest complete one)")
    p.add_argument("--out", default=None, help="output folder (default: data/models/<step_N>)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="saved dtype (default: the base's)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (default 5)")
    p.add_argument("--root", default=".", help="project root: data/ lives here")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run_export(args: argparse.Namespace) -> dict:
    import torch

    from cpt.training import checkpoint
    from cpt.training.export import export_checkpoint

    layout = Layout(Path(args.root))
    ckpt = layout.resolve(args.checkpoint) if args.checkpoint else checkpoint.latest(layout.checkpoints)
    if ckpt is None or not checkpoint.complete(ckpt):
        raise ConfigError(f"{ckpt or layout.checkpoints}: no complete checkpoint (state.json + .metadata) to export")
    out = layout.resolve(args.out) if args.out else layout.data / "models" / ckpt.name
    result = export_checkpoint(ckpt, layout.base, layout.tokenizer, out,
                               getattr(torch, args.dtype) if args.dtype else None, args.max_shard_gb)
    print(json.dumps(result))
    return result


def torchrun_argv(argv: list[str], environ=os.environ) -> list[str] | None:
    """``cpt train`` under ``torchrun`` when ``CPT_TORCHRUN`` holds torchrun's options (e.g. ``--nproc-per-node 8``,
    or ``--nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint head:29500 --rdzv-id cpt``): the argv
    to exec instead of this process, None when already a torchrun worker or not asked. This is how ``dvc repro``
    (whose stage command stays ``cpt train``) and the Prefect GPU deployments (docs/train.md) start several GPUs."""
    import shlex
    import sys

    options = environ.get("CPT_TORCHRUN", "").strip()
    if not options or "LOCAL_RANK" in environ:
        return None
    return [sys.executable, "-m", "torch.distributed.run", *shlex.split(options), "-m", "cpt.cli", *argv]
