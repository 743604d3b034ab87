"""The SFT training loop: train's own parts (cpt.training), fed with packed conversations instead of shards.

Reused, not copied: ``CausalLMLoss`` (fused chunked lm_head + cross-entropy; IGNORE targets cost nothing and the
position ids reach the model), ``train_step`` / ``evaluate`` (the mean over assistant tokens only), AdamW groups and
``set_lr``, the warmup + cosine / WSD schedule (``lr_for``), ``ReplaySampler`` (English replay rows mixed exactly per
step; the data position is one integer), atomic checkpoints and the resume decision against a fingerprint
(``resume_point``: a run with other params starts over, a finished run is re-exported), DDP / FSDP2 + compile
(``parallelize``) and the HF export. So exact resume holds as in train: the losses after a resume equal the
uninterrupted run's bit for bit on CPU (tests/test_sft.py).

The curve's row 0 is the CPT model itself, scored on the held-out conversations before any update: the CPT-vs-SFT
comparison of assistant-token loss comes from the same code, the same rows and the same template.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from cpt.device import autocast_dtype
from cpt.errors import CptError
from cpt.io import read_json
from cpt.ops import tracking
from cpt.progress import progress
from cpt.sft.packing import PackedSplit, to_device
from cpt.training import adapters, checkpoint, distributed
from cpt.training.data import ReplaySampler
from cpt.training.export import config_dtype
from cpt.training.loss import CausalLMLoss
from cpt.training.optim import build_optimizer, set_lr
from cpt.training.schedule import lr_for
from cpt.training.step import NonFiniteLoss, evaluate, train_step
from cpt.training.trainer import parallelize, resume_point, seed_everything

log = logging.getLogger("cpt.sft")
LN2 = math.log(2.0)
# sft keys that never change the trajectory (the rest, with the seed, the data and the model, is the fingerprint)
NOT_TRAJECTORY = {"eval_interval", "ckpt_interval", "keep_checkpoints", "resume", "parallel", "device", "compile",
                  "activation_checkpointing", "loss_chunk", "log_interval", "threads", "dtype", "samples", "gate",
                  "model_name", "plain_eval", "out", "max_eval", "bootstrap_resamples"}


class SftDiverged(CptError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def model_digest(folder: Path) -> str:
    """Cheap identity of an HF folder: config + every weight file's name, size, first and last MiB."""
    h = hashlib.sha256(Path(folder, "config.json").read_bytes())
    for f in sorted(Path(folder).glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def data_digest(splits: dict[str, PackedSplit | None]) -> str:
    h = hashlib.sha256()
    for name in sorted(splits):
        if splits[name] is not None:
            h.update(name.encode())
            h.update(splits[name].data.tobytes())
    return h.hexdigest()[:16]


def score(model, core, split: PackedSplit, micro_batch: int, info, device, amp_dtype) -> dict[str, float]:
    """Held-out assistant-token loss (nats/token) and bits per byte of one language's packed eval rows. Under
    several ranks the rows are cut to a multiple of the world size (FSDP needs every rank in every forward), as
    train's eval_rows does; the bytes are those of the rows scored."""
    n_rows = split.n_blocks - split.n_blocks % info.world_size
    rows = list(range(n_rows))[info.rank :: info.world_size]
    core.eval()
    batches = (to_device(split.rows(rows[i : i + micro_batch]), device) for i in range(0, len(rows), micro_batch))
    total, n = evaluate(model, batches, device=device, amp_dtype=amp_dtype)
    core.train()
    nbytes = int(split.row_bytes[:n_rows].sum())
    return {"loss": total / max(1, n), "bpb": total / LN2 / nbytes if nbytes else float("nan"), "tokens": n}


def train(cfg: dict, seed: int, *, model_dir: Path, tokenizer_dir: Path, train_splits: dict[str, PackedSplit | None],
          eval_splits: dict[str, PackedSplit], out: Path, ckdir: Path, info: distributed.DistInfo,
          device: torch.device, given: set[str] = frozenset()) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    amp_dtype = autocast_dtype(device, cfg["dtype"])
    model_config = read_json(model_dir / "config.json")
    fp = {k: v for k, v in cfg.items() if k not in NOT_TRAJECTORY and k != "sources"}
    fp.update(seed=seed, model=model_digest(model_dir), data=data_digest({**train_splits, **eval_splits}))
    resume_from = resume_point(cfg, fp, ckdir, info)
    seed_everything(seed)
    adapters.check_method("sft", cfg, device.type)
    if cfg["method"] == "qlora":
        hf_model = adapters.load_quantized(model_dir)
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    core = CausalLMLoss(hf_model, chunk_size=cfg["loss_chunk"]).to(device)
    n_rows = hf_model.get_input_embeddings().weight.shape[0]  # sft adds no tokens: LoRA alone trains
    peft_model = None if cfg["method"] == "full" else adapters.apply_lora(hf_model, cfg, n_rows, amp_dtype)

    def export() -> None:
        adapters.export(core, hf_model, peft_model, cfg, model_dir, tokenizer_dir, out, n_rows, save_dtype, info)

    model = parallelize(cfg, core, hf_model, info, device, amp_dtype)
    optimizer = build_optimizer(hf_model, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]),
                                betas=tuple(cfg["betas"]), embed_lr_mult=float(cfg["embed_lr_mult"]))
    clip_params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[str, Any] = {"step": 0, "samples": 0, "tokens": 0, "train_seconds": 0.0, "curve": []}
    if resume_from is not None:
        state = checkpoint.load(resume_from, core, optimizer)
        log.info("resuming from %s (step %d of %d)", resume_from, state["step"], cfg["steps"])
    save_dtype = config_dtype(model_config)
    if state.get("finished") and state["step"] == cfg["steps"]:
        log.info("%s is this run's final checkpoint: re-exporting %s without training", resume_from, out)
        export()
        kept = {k: v for k, v in state["metrics"].items() if k not in ("tokens_per_s", "mfu", "train_seconds")}
        return {**kept, "retrained": False}  # nothing trained here: no throughput

    def do_eval(step: int, lr: float) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step, "lr": lr}
        for lang, split in sorted(eval_splits.items()):
            s = score(model, core, split, cfg["micro_batch"], info, device, amp_dtype)
            row[f"loss_{lang}"], row[f"bpb_{lang}"] = s["loss"], s["bpb"]
        return row

    tracker = tracking.current()
    if info.main:
        tracker.log_params({f"sft.{k}": v for k, v in cfg.items() if k not in given and k != "sources"})
    sampler = ReplaySampler(train_splits["new"], train_splits["old"], float(cfg["replay_ratio"]), seed)
    curve: list[dict] = state["curve"]
    if not curve:
        curve.append(do_eval(0, 0.0))  # the CPT model before any update
    samples, tokens, train_seconds = state["samples"], state["tokens"], state["train_seconds"]
    global_batch = cfg["micro_batch"] * cfg["grad_accum"] * info.world_size
    start_step, last_good, train_loss, lr = state["step"], resume_from, float("nan"), 0.0

    def save(step: int, finished: bool, metrics: dict | None = None) -> None:
        checkpoint.save(ckdir, step, core, optimizer,
                        {"samples": samples, "tokens": tokens, "train_seconds": train_seconds, "curve": curve,
                         "finished": finished, "fingerprint": fp, "world_size": info.world_size,
                         "metrics": metrics}, keep=int(cfg["keep_checkpoints"]))

    core.train()
    bar = progress(total=cfg["steps"], initial=start_step, desc="sft", unit="step",
                   **({} if info.main else {"disable": True}))
    for step in range(start_step, cfg["steps"]):
        lr = lr_for(step, cfg)
        set_lr(optimizer, lr)
        micro = []
        for m in range(cfg["grad_accum"]):
            rows, _ = sampler.batch(samples + (m * info.world_size + info.rank) * cfg["micro_batch"],
                                    cfg["micro_batch"])
            micro.append(to_device(rows, device))
        t0 = time.perf_counter()
        try:
            result = train_step(model, optimizer, micro, device=device, amp_dtype=amp_dtype,
                                grad_clip=float(cfg["grad_clip"]), clip_params=clip_params)
        except NonFiniteLoss as exc:
            raise SftDiverged(f"sft: {exc} at step {step + 1} (lr {lr:.3g}); stopped, last good checkpoint: "
                              f"{last_good}. Lower sft.lr and rerun") from exc
        train_seconds += time.perf_counter() - t0
        samples += global_batch
        tokens += result.tokens
        train_loss = result.loss
        if info.main:
            tracker.log_metrics({"sft/loss": train_loss, "sft/lr": lr, "sft/grad_norm": result.grad_norm},
                                step=step + 1)
        bar.update(1)
        if (step + 1) % cfg["log_interval"] == 0:
            log.info("step %d/%d loss %.4f lr %.2e", step + 1, cfg["steps"], train_loss, lr)
        done = step + 1 == cfg["steps"]
        if (step + 1) % cfg["eval_interval"] == 0 or done:
            row = do_eval(step + 1, lr)
            row["train_loss"] = train_loss
            curve.append(row)
            if info.main:
                tracker.log_metrics({f"sft/val_{k}": v for k, v in row.items()
                                     if k.startswith(("loss_", "bpb_")) and math.isfinite(v)}, step=step + 1)
        if (step + 1) % cfg["ckpt_interval"] == 0 and not done:
            save(step + 1, finished=False)
            last_good = checkpoint.step_dir(ckdir, step + 1)
    bar.close()
    metrics = {"steps": cfg["steps"], "assistant_tokens": tokens, "train_seconds": train_seconds,
               "tokens_per_s": tokens / train_seconds if train_seconds else 0.0, "train_loss": train_loss,
               "epochs": sampler.epochs(samples), "curve": curve, "resumed_from": start_step or None,
               "retrained": True}
    save(cfg["steps"], finished=True, metrics=metrics)
    export()
    return metrics
