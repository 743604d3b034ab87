"""CPU training: cpt's train step vs the Hugging Face ``Trainer`` on the same batches, in one run.

What a user would pick instead of cpt to continue pretraining a small model on a CPU is ``transformers.Trainer``.
Both sides here train the same base (SmolLM2-135M by default) on the SAME pre-tokenized batches (one tensor file
written first and read by both: no tokenizer or dataloader cost differs), fp32, the same torch thread count, AdamW
with the same lr / betas / eps / weight decay (torch's single-tensor AdamW on both: cpt's default on CPU, and
``optim="adamw_torch"`` on HF, whose default on torch >= 2.8 would be the fused kernel), constant LR, grad-norm clip
1.0, and the same loss (mean token cross-entropy over the same B x T targets: HF gets ``shift_labels`` so it scores
exactly cpt's targets, not T - 1 of them):

    cpt   the train stage's step (cpt.training.step.train_step over cpt.training.loss.CausalLMLoss: the chunked
          fused lm_head + cross-entropy, never the B x T x vocab logits) with its optimizer groups and LR setter
    hf    ``Trainer(model, args, train_dataset=...)``, sequential sampling, ``model(input_ids, labels,
          shift_labels).loss`` (full fp32 logits, then cross-entropy)

Each side runs in its own interpreter, one after the other, so its peak RSS (``os.wait4``'s ru_maxrss of that child
alone) is its own: interpreter + imports + model + gradients + AdamW state + the step's activations. The first
``--warmup`` steps are not timed; tokens/s is timed steps x B x T over the wall time from the end of the last
warmup step to the end of the last step (for HF: ``on_step_end`` callbacks, so the Trainer's own per-step work is
counted, as it is what a user pays). The first-step losses of the two sides must agree (same weights, same batch):
the JSON records both, so a reader can see both sides did the same work.

    python bench/bench_train_cpu.py                       # SmolLM2, 4 x 512, 1 warmup + 3 timed steps: 6+ min, 2 cores
    python bench/bench_train_cpu.py --seq 256             # less memory (the box is shared)
    python bench/bench_train_cpu.py --loss-chunk 512 --activation-checkpointing   # the low-memory settings
    python bench/bench_train_cpu.py --smoke               # a tiny random Llama, seq 32: keeps the script from rotting

Writes bench/results/train_cpu.json (--out) and prints a markdown table.
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
SIDES = ("cpt", "hf")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/work/cache/smollm2-hf", help="HF folder of the base (safetensors)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (targets per row)")
    p.add_argument("--batch", type=int, default=4, help="sequences per optimizer step")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--loss-chunk", type=int, default=None, help="cpt's train.loss_chunk (default: the stage's)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer in backward, on both sides (train.activation_checkpointing; HF's "
                        "gradient_checkpointing), non-reentrant")
    p.add_argument("--sides", default="cpt,hf", help="comma list of cpt, hf (run in this order)")
    p.add_argument("--work", default="/tmp/cpt-bench-train-cpu", help="scratch folder (batches, tiny model, logs)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_cpu.json"))
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, seq 32, batch 2, 1 + 2 steps")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side (a child)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.seq, args.batch, args.warmup, args.steps = 32, 2, 1, 2
        args.model = None
    return args


# ---- the parent: batches, one child per side, the report ------------------------------------------------------------


def tiny_model(root: Path) -> Path:
    """A random 2-layer Llama with tied embeddings (as SmolLM2), saved as safetensors, for --smoke."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / "tiny-llama"
    if not (path / "model.safetensors").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=True)
        LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def write_batches(model: Path, args, root: Path) -> Path:
    """(warmup + steps, batch, seq + 1) int64 token ids, uniform over the base's vocabulary (seeded): the work of a
    step does not depend on which ids, and both sides read this one file."""
    import torch

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.warmup + args.steps, args.batch, args.seq + 1), generator=gen)
    path = root / f"batches_{args.warmup + args.steps}x{args.batch}x{args.seq + 1}.pt"
    torch.save(ids, path)
    return path


def run_side(side: str, spec_path: Path, root: Path) -> dict:
    """One side in a fresh interpreter; its peak RSS from the kernel's accounting of that child alone."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false", "CPT_TRACKING": "0", "CPT_PROGRESS": "0"}
    log = root / f"{side}.log"
    load_before = os.getloadavg()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--side", side, "--spec",
                                 str(spec_path)], stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    if rc:
        sys.exit(f"bench_train_cpu: the {side} side failed (exit {rc}); its log, {log}:\n"
                 f"{log.read_text()[-3000:]}")
    result = json.loads((root / f"{side}.json").read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: kB
    result["loadavg_before"] = list(load_before)
    return result


def machine() -> dict:
    import torch
    import transformers

    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) / 2**20
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(), "memory_gb": mem,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.side:
        return child(args.side, json.loads(Path(args.spec).read_text()))
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    sys.path.insert(0, str(REPO / "src"))
    from bench_train_gpu import git_commit

    from cpt.training.loop_config import LOOP_DEFAULTS

    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    model = tiny_model(root) if args.smoke else Path(args.model)
    if not (model / "config.json").exists():
        sys.exit(f"bench_train_cpu: {model}/config.json not found (--model: an HF folder with safetensors)")
    threads = args.threads or torch.get_num_threads()
    spec = {"model": str(model), "batches": str(write_batches(model, args, root)), "work": str(root),
            "seq": args.seq, "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "threads": threads,
            "lr": args.lr, "weight_decay": args.weight_decay, "betas": list(args.betas), "eps": 1e-8,
            "grad_clip": args.grad_clip, "loss_chunk": args.loss_chunk or LOOP_DEFAULTS["loss_chunk"],
            "activation_checkpointing": args.activation_checkpointing}
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    sides = {}
    for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
        if side not in SIDES:
            sys.exit(f"bench_train_cpu: --sides {args.sides!r}: unknown side {side!r} (cpt, hf)")
        sides[side] = run_side(side, spec_path, root)
    result = {"commit": git_commit(), "machine": machine(), "loadavg_after": list(os.getloadavg()),
              "load_note": "loadavg_* are os.getloadavg() (1, 5, 15 min) of the whole box: on a shared machine "
                           "other processes' load slows both sides; compare the ratio, not the absolute tokens/s",
              "settings": {**{k: v for k, v in spec.items() if k not in ("batches", "work")},
                           "smoke": args.smoke, "dtype": "float32", "tokens_per_step": args.batch * args.seq,
                           "data": "uniform random token ids (seeded), one tensor file read by both sides",
                           "lr_schedule": "constant", "optimizer": "torch.optim.AdamW, single-tensor (foreach off)",
                           "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "glibc"},
              "sides": sides}
    if {"cpt", "hf"} <= sides.keys():
        cpt, hf = sides["cpt"], sides["hf"]
        result["ratios"] = {"tokens_per_s": cpt["tokens_per_s"] / hf["tokens_per_s"],
                            "peak_rss": cpt["peak_rss_mb"] / hf["peak_rss_mb"],
                            "tokens_per_cpu_s": cpt["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"],
                            "first_step_loss_diff": abs(cpt["losses"][0] - hf["losses"][0])}
        result["goals"] = {"tokens_per_s": ">= 1.0", "peak_rss": "<= 0.7",
                           "met": {"tokens_per_s": result["ratios"]["tokens_per_s"] >= 1.0,
                                   "peak_rss": result["ratios"]["peak_rss"] <= 0.7}}
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict) -> str:
    s = result["settings"]
    lines = [f"{Path(s['model']).name}: {s['batch']} x {s['seq']} tokens per step, fp32, {s['threads']} threads, "
             f"{s['warmup']} warmup + {s['steps']} timed steps per side",
             "| side | tokens/s | s/step | CPU s/step | peak RSS MB | RSS after load MB | first-step loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["sides"].items():
        lines.append(f"| {name} | {r['tokens_per_s']:,.1f} | {r['step_s']:.2f} | {r['cpu_s_per_step']:.2f} "
                     f"| {r['peak_rss_mb']:,.0f} | {r['rss_after_load_mb']:,.0f} | {r['losses'][0]:.5f} |")
    if "ratios" in result:
        rt = result["ratios"]
        lines.append(f"\ncpt / HF tokens/s: {rt['tokens_per_s']:.2f} (goal >= 1.0); cpt / HF peak RSS: "
                     f"{rt['peak_rss']:.2f} (goal <= 0.7); tokens per CPU second: {rt['tokens_per_cpu_s']:.2f}; "
                     f"first-step losses differ by {rt['first_step_loss_diff']:.2e}")
    return "\n".join(lines)


# ---- a child: one side ----------------------------------------------------------------------------------------------


def stamp(stamps: list, losses: list) -> None:
    """(wall, this process's user + system CPU seconds, all threads): on a shared box the wall clock also counts
    time the side waited for a core; its CPU seconds do not."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stamps.append((time.perf_counter(), usage.ru_utime + usage.ru_stime))
    if len(stamps) > 1:
        loss = f" loss {losses[len(stamps) - 2]:.4f}" if len(losses) >= len(stamps) - 1 else ""
        print(f"step {len(stamps) - 1}: {stamps[-1][0] - stamps[-2][0]:.1f} s wall, "
              f"{stamps[-1][1] - stamps[-2][1]:.1f} s CPU{loss}", flush=True)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(side: str, spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    batches = torch.load(spec["batches"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.config.use_cache = False
    loaded = rss_mb()
    stamps, losses = (run_cpt if side == "cpt" else run_hf)(model, batches, spec)
    w = spec["warmup"]  # stamps[0]: before step 1; stamps[i]: (wall, cpu) after step i
    seconds, cpu_seconds = stamps[-1][0] - stamps[w][0], stamps[-1][1] - stamps[w][1]
    tokens = spec["steps"] * spec["batch"] * spec["seq"]
    out = {"side": side, "tokens_per_s": tokens / seconds, "step_s": seconds / spec["steps"],
           "tokens_per_cpu_s": tokens / cpu_seconds, "cpu_s_per_step": cpu_seconds / spec["steps"],
           "step_times_s": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])], "losses": losses,
           "rss_after_load_mb": loaded, "threads": torch.get_num_threads()}
    Path(spec["work"], f"{side}.json").write_text(json.dumps(out, indent=2))
    return out


def run_cpt(model, batches, spec: dict) -> tuple[list[float], list[float]]:
    """The train stage's loop body (cpt.training.trainer.train), minus eval, checkpoints and logging."""
    import torch

    from cpt.training.loss import CausalLMLoss
    from cpt.training.measure import to_xy
    from cpt.training.optim import build_optimizer, set_lr
    from cpt.training.schedule import lr_for
    from cpt.training.step import train_step

    device = torch.device("cpu")
    if spec["activation_checkpointing"]:  # as cpt.training.trainer.parallelize does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    core = CausalLMLoss(model, chunk_size=spec["loss_chunk"])
    optimizer = build_optimizer(model, lr=spec["lr"], weight_decay=spec["weight_decay"], betas=tuple(spec["betas"]),
                                eps=spec["eps"])
    clip_params = [p for g in optimizer.param_groups for p in g["params"]]
    n = spec["warmup"] + spec["steps"]
    cfg = {"embed_only_steps": 0, "steps": n, "lr": spec["lr"], "min_lr": spec["lr"], "warmup": 0.0,
           "schedule": "constant", "decay_fraction": 0.2}
    core.train()
    stamps: list[tuple[float, float]] = []
    losses: list[float] = []
    stamp(stamps, losses)
    for step in range(n):
        set_lr(optimizer, lr_for(step, cfg))
        micro = [to_xy(batches[step], device)]
        result = train_step(core, optimizer, micro, device=device, amp_dtype=None, grad_clip=spec["grad_clip"],
                            clip_params=clip_params)
        losses.append(result.loss)
        stamp(stamps, losses)
    return stamps, losses


def run_hf(model, batches, spec: dict) -> tuple[list[float], list[float]]:
    """``transformers.Trainer`` as its docs use it, on the same rows in the same order."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    rows = [{"input_ids": b[:-1], "labels": b[1:], "shift_labels": b[1:]} for batch in batches for b in batch]
    stamps: list[tuple[float, float]] = []
    losses: list[float] = []

    class Stamps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamp(stamps, losses)

        def on_step_end(self, args, state, control, **kw):
            stamp(stamps, losses)

    class RecordingTrainer(Trainer):
        def compute_loss(self, model, inputs, *a, **kw):
            loss = super().compute_loss(model, inputs, *a, **kw)
            losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    def collate(items):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    n = spec["warmup"] + spec["steps"]
    args = TrainingArguments(
        output_dir=str(Path(spec["work"], "hf-trainer")), per_device_train_batch_size=spec["batch"], max_steps=n,
        learning_rate=spec["lr"], weight_decay=spec["weight_decay"], adam_beta1=spec["betas"][0],
        adam_beta2=spec["betas"][1], adam_epsilon=spec["eps"], max_grad_norm=spec["grad_clip"],
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, train_sampling_strategy="sequential", seed=0,
        remove_unused_columns=False,  # else the Trainer drops shift_labels (not a named forward argument)
        gradient_checkpointing=spec["activation_checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                               callbacks=[Stamps()])
    trainer.train()
    if len(stamps) != n + 1 or len(losses) != n:
        raise RuntimeError(f"hf: expected {n} steps, saw {len(stamps) - 1} step ends and {len(losses)} losses")
    return stamps, losses


if __name__ == "__main__":
    main()
