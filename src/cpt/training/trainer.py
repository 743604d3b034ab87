"""The continual-pretraining loop, read top to bottom (as nanoGPT's train.py), one named phase per function (as
torchtitan's trainer): ``setup`` -> ``resume_point`` -> ``build_model`` (load, resize, initialise the new rows) ->
``parallelize`` -> the step loop (``train``) with ``evaluate_val`` and ``save_checkpoint`` -> ``export_model``.

The stage (``cpt.stages.train``) reads the config and calls ``train``; everything here is config in, files out.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpt.device import autocast_dtype
from cpt.errors import ConfigError, CptError, DataError
from cpt.io import read_json
from cpt.layout import Layout
from cpt.ops import tracking
from cpt.progress import progress
from cpt.training import adapters, checkpoint, distributed, flops, sharded
from cpt.training.curve import truncate_step_log, write_curve
from cpt.training.data import ReplaySampler, ShardSplit, open_shards
from cpt.training.embeddings import extend_embeddings
from cpt.training.export import config_dtype
from cpt.training.loss import CausalLMLoss
from cpt.training.measure import (LN2, bpb, calibration_blocks, domain_losses, lang_rows, mean_loss,
    resize_probe_rows, split_bpb, to_xy)
from cpt.training.optim import apply_hparams, build_optimizer, set_lr
from cpt.training.resume import (changed_items, check_forceable, describe_changes, fingerprint_items,
    world_size_grad_accum)
from cpt.training.schedule import lr_for
from cpt.training.step import NonFiniteLoss, train_step
from cpt.training.summary import final_metrics, per_language  # noqa: F401  (per_language: re-exported)

log = logging.getLogger("cpt.stages.train")


class TrainingDiverged(CptError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class Inputs:
    """What the run reads: the extended tokenizer's mapping and the token shards (train and val, per domain)."""

    new_tokens: dict[str, Any]
    shards: Any
    train_new: ShardSplit | None
    train_old: ShardSplit | None
    val: dict[str, ShardSplit | None]
    base_config: dict[str, Any]

    @property
    def block(self) -> int:
        return self.shards.block_size


@dataclass
class RunState:
    """Everything a checkpoint carries besides the weights and the optimizer (the data position is ``samples``)."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    curve: list[dict] = field(default_factory=list)
    finished: bool = False
    resize: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> "RunState":
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in payload.items() if k in keys})


# ---- setup ---------------------------------------------------------------------------------------------------------


def setup(layout: Layout) -> Inputs:
    for path, stage in ((layout.base / "config.json", "base"), (layout.tokenizer / "new_tokens.json", "tokenizer")):
        if not path.exists():
            raise DataError(f"{path}: not found; run `cpt {stage}` first")
    new_tokens = read_json(layout.tokenizer / "new_tokens.json")
    shards = open_shards(layout.shards)
    if shards.vocab_size > int(new_tokens["vocab"]):
        raise DataError(f"{layout.shards}/meta.json: vocab_size {shards.vocab_size} > the tokenizer's "
                        f"{new_tokens['vocab']} ({layout.tokenizer}/new_tokens.json): shards from another tokenizer?")
    return Inputs(new_tokens=new_tokens, shards=shards, train_new=shards.split("new/train"),
                  train_old=shards.split("old/train"),
                  val={"new": shards.split("new/val"), "old": shards.split("old/val")},
                  base_config=read_json(layout.base / "config.json"))


def resume_point(cfg: dict, fp: dict[str, Any], ckdir: Path, info: distributed.DistInfo) -> Path | None:
    """The checkpoint to continue (``train.resume``), or None; checkpoints of another run are removed, logged."""
    newest = checkpoint.latest(ckdir)
    start_over = None
    if newest is not None and not cfg["resume"]:
        start_over = "train.resume=false"
    elif newest is not None:
        changed = changed_items(checkpoint.read_state(newest).get("fingerprint", {}), fp)
        if changed and cfg["resume"] == "force":
            check_forceable(newest, changed)
        elif changed:
            start_over = f"{newest} was made with other params ({describe_changes(changed)})"
    if info.main:
        ckdir.mkdir(parents=True, exist_ok=True)
        checkpoint.sweep_temp(ckdir)
        if start_over == "train.resume=false":
            log.warning("%s: removing the checkpoints in %s and training from scratch", start_over, ckdir)
            checkpoint.clear(ckdir)
        elif start_over:  # other inputs (a changed base, tokenizer, data or params): never silently reused
            aside = checkpoint.move_aside(ckdir, start_over)
            log.warning("%s: its checkpoints moved to %s; training from scratch", start_over, aside)
    if info.enabled:
        torch.distributed.barrier()
    return None if start_over else newest


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- model: load, resize, initialise the new rows -------------------------------------------------------------------


def build_model(cfg: dict, layout: Layout, inputs: Inputs, device: torch.device, amp_dtype, seed: int,
                fresh: bool, info: distributed.DistInfo | None = None) -> tuple[Any, CausalLMLoss, RunState]:
    """The base model with the extended vocab, built on the meta device and sharded first under FSDP, so no rank
    holds the whole fp32 model (cpt.training.sharded). A fresh run loads the base (each rank its slices),
    initialises and calibrates the new rows and measures the old-domain loss before and after the extension; a
    resumed run gets every weight from its checkpoint and reads nothing here."""
    rows_before = sharded.base_rows(layout.base)
    if cfg.get("method") == "qlora":  # the 4-bit base comes from bitsandbytes' loader, resized in place, one process
        hf_model = adapters.load_quantized(layout.base, bool(cfg["trust_remote_code"]))
        embed_report = extend_embeddings(hf_model, inputs.new_tokens, cfg["embed_init"], seed)
        core = CausalLMLoss(hf_model, chunk_size=cfg["loss_chunk"])
        if not fresh:
            return hf_model, core, RunState()
    else:
        hf_model = sharded.build_on_meta(layout.base, sharded.vocab_rows(inputs.new_tokens, rows_before),
                                         trust_remote_code=bool(cfg["trust_remote_code"]))
        core = CausalLMLoss(hf_model, chunk_size=cfg["loss_chunk"])
        if cfg["parallel"] == "fsdp" and info is not None and info.enabled:
            distributed.shard(core, hf_model, amp_dtype)
        sharded.materialize(hf_model, device)
        if not fresh:
            return hf_model, core, RunState()
        base_vocab = sharded.load_base(hf_model, layout.base)
        embed_report = sharded.init_vocab_rows(hf_model, base_vocab, inputs.new_tokens, cfg["embed_init"], seed)
        del base_vocab
    old_rows = resize_probe_rows(inputs.val["old"], cfg["eval_blocks"], rows_before)
    core.vocab_limit = rows_before  # scored as the base model: the new rows are not in the softmax
    old_before = mean_loss(core, inputs.val["old"], old_rows, cfg["micro_batch"], device, amp_dtype)
    core.vocab_limit = None
    if cfg["new_token_mass"]:
        embed_report.update(sharded.calibrate(
            core, hf_model, calibration_blocks(inputs.train_old).to(device),
            int(inputs.new_tokens["base_vocab"]), float(cfg["new_token_mass"])))
    old_after = mean_loss(core, inputs.val["old"], old_rows, cfg["micro_batch"], device, amp_dtype)
    change = (old_after - old_before) / old_before if old_before and math.isfinite(old_before) else float("nan")
    log.info("old-domain val loss before resize %.4f, after %.4f (%+.2f%%, %d blocks; init %s)",
             old_before, old_after, 100 * change, len(old_rows), cfg["embed_init"])
    distributed.reshard(core)  # the optimizer must see the sharded parameters
    return hf_model, core, RunState(resize={**embed_report, "old_loss_before": old_before,
                                            "old_loss_after": old_after, "old_loss_change": change,
                                            "probe_blocks": len(old_rows)})


def parallelize(cfg: dict, core: CausalLMLoss, hf_model, info: distributed.DistInfo, device: torch.device, amp_dtype):
    """Per-layer activation checkpointing, torch.compile (per layer under FSDP2), then DDP / FSDP2 (FSDP2 was
    applied on the meta device by ``build_model``; or nothing, single process)."""
    if cfg["activation_checkpointing"]:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg["compile"]:
        if cfg["parallel"] == "fsdp" and info.enabled:
            for blk in hf_model.modules():
                if isinstance(blk, distributed.block_classes(hf_model)):
                    blk.compile()
        else:
            core.compile()  # in place: the state-dict keys stay the model's
    return distributed.wrap(core, hf_model, cfg["parallel"], info, device, amp_dtype)


# ---- eval during training -------------------------------------------------------------------------------------------


def evaluate_val(model, core, inputs: Inputs, eval_sets: dict[str, dict[str, np.ndarray]], cfg: dict, info, device,
                 amp_dtype) -> dict[str, float]:
    """Loss and exact bits per byte on val blocks of each domain, per language (``bpb_<domain>_<lang>``) and pooled
    over the domain's scored blocks (``bpb_<domain>``); sharded over ranks."""
    row: dict[str, float] = {}
    specials = tuple(i for i in (inputs.shards.meta.get("bos_id"), inputs.shards.meta.get("eos_id")) if i is not None)
    core.eval()
    for d in ("new", "old"):
        split, groups = inputs.val[d], eval_sets[d]
        row[f"loss_{d}"] = row[f"bpb_{d}"] = float("nan")
        if split is None or not groups:
            continue
        parts = {lang: split_bpb(model, split, rows, cfg["micro_batch"], device, amp_dtype, specials, info.rank,
                                 info.world_size) for lang, rows in groups.items()}
        loss_sum, tokens = sum(p["loss_sum"] for p in parts.values()), sum(p["tokens"] for p in parts.values())
        nll, nbytes = sum(p["nll"] for p in parts.values()), sum(p["bytes"] for p in parts.values())
        row[f"loss_{d}"] = loss_sum / tokens if tokens else float("nan")
        row[f"bpb_{d}"] = parts["all"]["bpb"] if "all" in parts else (nll / (LN2 * nbytes) if nbytes else float("nan"))
        for lang, p in parts.items():
            if lang != "all":
                row[f"bpb_{d}_{lang}"] = p["bpb"]
    core.train()
    distributed.reshard(core)
    return row


# ---- the run --------------------------------------------------------------------------------------------------------


def train(cfg: dict, seed: int, layout: Layout, info: distributed.DistInfo, device: torch.device,
          given: set[str] = frozenset()) -> dict:
    inputs = setup(layout)
    adapters.check_method("train", cfg, device.type)
    amp_dtype = autocast_dtype(device, cfg["dtype"])
    ckdir = layout.checkpoints
    fp = fingerprint_items(cfg, seed, inputs.shards.meta, layout.base, layout.tokenizer, info.world_size,
                          layout.shards)
    cfg = {**cfg, "grad_accum": world_size_grad_accum(cfg, fp, ckdir, info)}
    fp = {**fp, "global_batch": cfg["micro_batch"] * cfg["grad_accum"] * info.world_size}  # the hashes stay
    global_batch = cfg["micro_batch"] * cfg["grad_accum"] * info.world_size
    tokens_per_step = global_batch * (inputs.block - 1)
    resume_from = resume_point(cfg, fp, ckdir, info)
    seed_everything(seed)

    hf_model, core, state = build_model(cfg, layout, inputs, device, amp_dtype, seed, fresh=resume_from is None,
                                        info=info)
    save_dtype = config_dtype(inputs.base_config)
    n_old = int(inputs.new_tokens["base_vocab"])  # lora / qlora: LoRA on the body, rows n_old.. of the vocab train
    peft_model = adapters.apply_lora(hf_model, cfg, n_old, amp_dtype) if cfg.get("method", "full") != "full" else None

    def export() -> None:
        adapters.export(core, hf_model, peft_model, cfg, layout.base, layout.tokenizer, layout.model, n_old,
                        save_dtype, info)

    n_params = flops.count_params(hf_model)
    layers, width = flops.model_shape(hf_model.config)
    per_token = flops.flops_per_token(flops.matmul_params(hf_model), layers, width, inputs.block - 1)  # PaLM N

    model = parallelize(cfg, core, hf_model, info, device, amp_dtype)
    optimizer = build_optimizer(hf_model, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]),
                                betas=tuple(cfg["betas"]), embed_lr_mult=float(cfg["embed_lr_mult"]))
    clip_params = [p for g in optimizer.param_groups for p in g["params"]]
    if resume_from is not None:
        state = RunState.from_checkpoint(checkpoint.load(resume_from, core, optimizer))
        # loading the optimizer state restored the checkpoint's hyperparameters; resume: force may have changed them
        apply_hparams(optimizer, weight_decay=float(cfg["weight_decay"]), betas=tuple(cfg["betas"]),
                      embed_lr_mult=float(cfg["embed_lr_mult"]))
        log.info("resuming from %s (step %d of %d, %d samples)", resume_from, state.step, cfg["steps"], state.samples)

    # a finished run is re-exported, not retrained
    if state.step > cfg["steps"]:
        raise ConfigError(f"{resume_from}: the checkpoint is at step {state.step}, past train.steps="
                          f"{cfg['steps']}; raise train.steps or use train.resume=false")
    if state.finished and state.step == cfg["steps"]:
        log.info("%s is the final checkpoint of this run (step %d): re-exporting %s without training "
                 "(set train.resume=false to retrain)", resume_from, state.step, layout.model)
        if info.main:  # dvc repro deletes the stage's outputs first: the curve comes back with the model
            write_curve(layout.metrics / "train_curve.csv", state.curve)
        export()
        # the results of the run that trained it, not its timings: nothing was trained here, so no throughput
        kept = {k: v for k, v in state.metrics.items() if k not in ("tokens_per_s", "mfu", "train_seconds")}
        return {**kept, "retrained": False, "resumed_from": state.step}

    sampler = ReplaySampler(inputs.train_new, inputs.train_old, float(cfg["replay_ratio"]), seed)
    eval_sets = {d: lang_rows(inputs.val[d], cfg["eval_blocks"], info.world_size) for d in ("new", "old")}
    peak = flops.peak_flops(device, cfg["peak_tflops"])
    tracker = tracking.current()
    step_log = ckdir / "steps.jsonl"
    if info.main:
        # params.yaml's own keys are logged by the tracker; add the defaults this run used and the model size
        tracker.log_params({f"train.{k}": v for k, v in cfg.items() if k not in given} | {"train.n_params": n_params})
        truncate_step_log(step_log, state.step)
    start_step = state.step

    def val_row(step: int, lr: float, train_loss: float | None) -> dict:
        return {"step": step, "tokens": state.tokens, "lr": lr, "train_loss": train_loss,
                **evaluate_val(model, core, inputs, eval_sets, cfg, info, device, amp_dtype)}

    saver = checkpoint.Checkpointer(ckdir, keep=int(cfg["keep_checkpoints"]),
                                    async_save=bool(cfg["async_checkpoint"]))

    def save_checkpoint(step: int, finished: bool, metrics: dict | None = None) -> None:
        payload = {"samples": state.samples, "tokens": state.tokens, "train_seconds": state.train_seconds,
                   "curve": state.curve, "finished": finished, "resize": state.resize, "fingerprint": fp,
                   "world_size": info.world_size, "micro_batch": cfg["micro_batch"],
                   "grad_accum": cfg["grad_accum"], "metrics": metrics}
        saver.save(step, core, optimizer, payload)

    if not state.curve:  # the resized model, before any update: where both curves start
        state.curve.append(val_row(0, 0.0, None))
    core.train()
    bar = progress(total=cfg["steps"], initial=start_step, desc="train", unit="step",
                   **({} if info.main else {"disable": True}))
    last_good = resume_from
    train_loss, lr = float("nan"), 0.0
    for step in range(start_step, cfg["steps"]):
        lr = lr_for(step, cfg)
        set_lr(optimizer, lr)
        micro, is_old = [], []
        for m in range(cfg["grad_accum"]):
            first = state.samples + (m * info.world_size + info.rank) * cfg["micro_batch"]
            blocks, old = sampler.batch(first, cfg["micro_batch"])
            micro.append(to_xy(blocks, device))
            is_old.append(old)
        t0 = time.perf_counter()
        try:
            result = train_step(model, optimizer, micro, device=device, amp_dtype=amp_dtype,
                                grad_clip=float(cfg["grad_clip"]), clip_params=clip_params,
                                embed_only=step < int(cfg["embed_only_steps"]))
        except NonFiniteLoss as exc:
            where = f"the last good checkpoint {last_good} is kept" if last_good else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"train: {exc} at step {step + 1} (lr {lr:.3g}); stopped, {where}. Lower train.lr or raise "
                f"train.warmup and rerun with train.resume=force to continue from it"
            ) from exc
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        state.train_seconds += dt
        state.samples += global_batch
        state.tokens += tokens_per_step
        train_loss = result.loss
        dom = domain_losses(result.token_losses, is_old, device)
        tps = tokens_per_step / dt
        record = {"step": step + 1, "loss": train_loss, "loss/new": dom["new"], "loss/old": dom["old"],
                  "bpb/new": bpb(dom["new"], inputs.train_new), "bpb/old": bpb(dom["old"], inputs.train_old),
                  "lr": lr, "grad_norm": result.grad_norm, "tokens_per_s": tps,
                  "mfu": flops.mfu(tps, per_token, peak, info.world_size)}
        if info.main:
            tracker.log_metrics({k: v for k, v in record.items() if k != "step" and v is not None}, step=step + 1)
            with open(step_log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        bar.update(1)
        if (step + 1) % cfg["log_interval"] == 0:
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            log.info("step %d/%d loss %.4f (new %.4f old %.4f) lr %.2e %.0f tok/s", step + 1, cfg["steps"],
                     train_loss, dom["new"], dom["old"], lr, tps)
        done = step + 1 == cfg["steps"]
        if (step + 1) % cfg["eval_interval"] == 0 or done:
            row = val_row(step + 1, lr, train_loss)
            state.curve.append(row)
            if info.main:
                val = {f"val_{k.replace('_', '/')}": row[k] for k in ("loss_new", "loss_old", "bpb_new", "bpb_old")}
                val |= {f"bpb/{k[4:7]}/{k[8:]}": v for k, v in row.items() if k[:8] in ("bpb_new_", "bpb_old_")}
                tracker.log_metrics({k: v for k, v in val.items() if math.isfinite(v)}, step=step + 1)
                write_curve(layout.metrics / "train_curve.csv", state.curve)
        saver.poll()
        if (step + 1) % cfg["ckpt_interval"] == 0 and not done:
            save_checkpoint(step + 1, finished=False)
            last_good = checkpoint.step_dir(ckdir, step + 1)
    bar.close()

    metrics = final_metrics(cfg, state, start_step, train_loss, sampler, per_token, peak, n_params, info, device)
    if peft_model is not None:
        metrics["adapter"] = {"method": cfg["method"], **adapters.trainable_report(hf_model, n_old)}
    if info.main:
        write_curve(layout.metrics / "train_curve.csv", state.curve)
    save_checkpoint(cfg["steps"], finished=True, metrics=metrics)
    saver.wait()  # the final checkpoint is complete before the model is exported
    export()
    return metrics
