"""Training-step throughput on a GPU: cpt's train step vs plain transformers, in the same run.

TinyLlama-1.1B shape (22 layers, d 2048, GQA 32/4, FFN 5632) with the vocabulary a language extension gives (~40k,
padded to a multiple of 64), seq 2048, bf16 autocast, random init, fused AdamW in every variant:

    hf_eager     LlamaForCausalLM(input_ids, labels).loss, eager (the 48.5 % MFU anchor in field-notes.md)
    hf_compile   the same under torch.compile (the 57.6 % anchor; --hf-compile, costs a second compile)
    cpt          cpt.training.step.train_step over cpt.training.loss.CausalLMLoss, compiled: the stage's own step
                 (chunked lm_head + cross-entropy with its gradient computed in forward, no full logits tensor)
    cpt_fsdp     the same step on the train stage's multi-GPU path: built on the meta device, FSDP2 fully_shard per
                 decoder layer + root (bf16 params, fp32 reduce), each layer compiled; world size 1 on one GPU (the
                 FSDP2 overhead), or N under ``torchrun --nproc-per-node N`` (tokens/s and MFU over all ranks)

Reports tokens/s, MFU (6N + 12·L·d·T FLOPs per token over the measured bf16 matmul peak, cpt.training.flops) and
peak memory; prints a markdown table and writes JSON. Needs only torch + transformers (+ this repo's src/).

    python bench/bench_train_gpu.py                      # H100: ~5 min
    python bench/bench_train_gpu.py --smoke              # CPU, tiny shape, 2 steps: keeps the script from rotting
    torchrun --nproc-per-node 8 bench/bench_train_gpu.py --variants cpt_fsdp   # FSDP2 over 8 GPUs
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from cpt.device import autocast  # noqa: E402
from cpt.training import flops  # noqa: E402
from cpt.training.embeddings import padded  # noqa: E402
from cpt.training.loss import CausalLMLoss  # noqa: E402
from cpt.training.optim import build_optimizer, set_lr  # noqa: E402
from cpt.training.step import train_step  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=40_000, help="extended vocab; padded up to a multiple of 64")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation happens here)")
    p.add_argument("--variants", default="hf_eager,cpt,cpt_fsdp",
                   help="comma list of hf_eager, hf_compile, cpt, cpt_eager, cpt_fsdp")
    p.add_argument("--hf-compile", action="store_true", help="also run hf_compile")
    p.add_argument("--loss-chunk", type=int, default=4096)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak; default: measured")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_gpu.json"))
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, 2 steps, no compile")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.d_model, args.heads, args.kv_heads, args.ffn = 2, 64, 4, 2, 128
        args.vocab, args.seq, args.micro_batch, args.steps, args.warmup = 300, 64, 2, 2, 1
        args.variants = "hf_eager,cpt_eager,cpt_fsdp"
    elif args.hf_compile and "hf_compile" not in args.variants:
        args.variants += ",hf_compile"
    return args


def model_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=padded(args.vocab, 64), hidden_size=args.d_model, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False, attn_implementation="sdpa",
    )


def build_model(args, device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(model_config(args))
    return model


def build_fsdp(args, device, amp_dtype):
    """The train stage's multi-GPU model: meta-device build, per-layer compile, FSDP2, then materialised and
    initialised in place (random weights: a throughput bench, as the other variants)."""
    from transformers import LlamaForCausalLM

    from cpt.training import distributed, sharded

    with sharded.params_on_meta():
        model = LlamaForCausalLM(model_config(args))
    core = CausalLMLoss(model, chunk_size=args.loss_chunk)
    if device.type == "cuda" and not args.smoke:
        for blk in model.modules():
            if isinstance(blk, distributed.block_classes(model)):
                blk.compile()
    distributed.shard(core, model, amp_dtype)
    sharded.materialize(model, device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    return model, core


def run_variant(name: str, args, device: torch.device, amp_dtype, peak) -> dict:
    world = torch.distributed.get_world_size() if name == "cpt_fsdp" else 1
    if name == "cpt_fsdp":
        model, core = build_fsdp(args, device, amp_dtype)
    else:
        model = build_model(args, device)
    n_params = flops.count_params(model)
    per_token = flops.flops_per_token(n_params, args.layers, args.d_model, args.seq)
    opt = build_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))  # fused on CUDA
    set_lr(opt, 3e-4)
    clip = [p for g in opt.param_groups for p in g["params"]]
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(1 + (torch.distributed.get_rank() if world > 1 else 0))
    data = torch.randint(0, args.vocab, (args.micro_batch, args.seq + 1), generator=gen).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    if name.startswith("cpt"):
        if name != "cpt_fsdp":
            core = CausalLMLoss(model, chunk_size=args.loss_chunk)
        if name == "cpt" and device.type == "cuda":
            core.compile()

        def step():
            return train_step(core, opt, [(x, y)], device=device, amp_dtype=amp_dtype, grad_clip=1.0,
                              clip_params=clip).loss
    else:
        fwd = torch.compile(model) if name == "hf_compile" else model

        def step():
            with autocast(device, amp_dtype):
                loss = _hf_loss(fwd, x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clip, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss = float("nan")
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tokens = args.micro_batch * args.seq * world
    tps = tokens / dt
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, opt, data, x, y
    return {
        "variant": name, "tokens_per_s": tps, "step_ms": dt * 1e3, "mfu": flops.mfu(tps, per_token, peak, world),
        "world_size": world,
        "peak_mem_gib": peak_mem, "loss": loss, "warmup_s": warm_s, "params": n_params, "vocab_padded": vocab,
        "flops_per_token": per_token,
    }


def _hf_loss(model, x, y):
    """Plain transformers usage: ``labels=input_ids`` (shifted inside), full logits, its upcasting cross-entropy."""
    return model(input_ids=x, labels=x).loss


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001 - the bench box may have no git
        return None


def table(rows: list[dict], base: dict | None) -> str:
    lines = ["| variant | tokens/s | step ms | MFU | peak mem GiB | vs hf_eager | loss |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:60]} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        ratio = f"{r['speedup_vs_hf_eager']:.2f}x" if base else "-"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.0f} | {mfu} | {mem} | {ratio} "
                     f"| {r['loss']:.3f} |")
    return "\n".join(lines)


def process_group(device: torch.device) -> bool:
    """cpt_fsdp needs torch.distributed: torchrun's group (NCCL on GPU), else a world of one. True if started."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns_group = "cpt_fsdp" in args.variants and process_group(device)
    main_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = flops.peak_flops(device, args.peak_tflops)
    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        try:
            rows.append(run_variant(name, args, device, amp_dtype, peak))
        except Exception as exc:  # noqa: BLE001 - one failing variant must not hide the others' numbers
            traceback.print_exc()
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    base = next((r for r in rows if r["variant"] == "hf_eager" and "error" not in r), None)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "commit": git_commit(), "peak_tflops": peak / 1e12 if peak else None,
        "shape": {k: getattr(args, k) for k in ("layers", "d_model", "heads", "kv_heads", "ffn", "vocab", "seq",
                                                "micro_batch", "steps", "warmup", "loss_chunk")},
        "rows": rows,
    }
    for r in rows:
        if base and "error" not in r:  # per GPU: hf_eager runs on one
            r["speedup_vs_hf_eager"] = r["tokens_per_s"] / r.get("world_size", 1) / base["tokens_per_s"]
    if owns_group:
        torch.distributed.destroy_process_group()
    if not main_rank:
        return result
    md = table(rows, base)
    print(f"\n{result['device']}, torch {result['torch']}, commit {result['commit']}, "
          f"bf16 peak {result['peak_tflops'] and round(result['peak_tflops'])} TFLOP/s\n")
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o)
                              else str(o)) + "\n")
    return result


if __name__ == "__main__":
    main()
