"""Stage ``train``: continual pretraining of the base model on the new language, with replay of the old one.

Reads data/base (HF model), data/tokenizer (extended tokenizer + new_tokens.json) and data/shards (token blocks);
writes data/models/cpt (HF folder + the extended tokenizer), data/checkpoints/ (resumable), metrics/train_curve.csv.
Readable top to bottom like nanoGPT's train.py; each concern lives in cpt/training/:

    data.py         memmap shards, replay mixing, the data position (one integer)
    embeddings.py   resize to the extended vocab (padded to 64) and initialise the new rows
    loss.py         lm_head + cross-entropy in chunks, no full logits tensor
    optim.py        AdamW groups (embeddings/lm_head LR multiplier), embeddings-only phase
    step.py         one optimizer step (also what bench/bench_train_gpu.py times)
    schedule.py     warmup + cosine / WSD, a pure function of the step
    checkpoint.py   atomic checkpoints, exact resume
    distributed.py  torchrun, DDP / FSDP2
    flops.py        MFU

Resume (``train.resume``), decided against a fingerprint of every param that shapes the run (seed, data, base, and
the train keys that change the trajectory), stored in each checkpoint:

- ``true`` (default): the newest complete checkpoint of THIS run (same fingerprint) is continued, and the losses at
  every later step equal the uninterrupted run's bit for bit on CPU (tests/test_train_resume.py kills one with
  SIGKILL). A run whose final checkpoint is there is NOT retrained: data/models/cpt is re-exported from it and the
  stored metrics are returned (``retrained: false``). Checkpoints of a run with other params (``dvc exp run -S
  train.lr=...`` with ``persist: true`` checkpoints) are removed with a warning naming the changed params, and
  training starts over.
- ``force``: continue the newest checkpoint even though schedule params changed (lr, steps, warmup, ...: "it
  diverged, continue with a lower LR", "train 1000 steps more"); other changes (data, batch, init, seed) refuse.
- ``false``: remove the checkpoints and start over.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpt import tracking
from cpt.device import autocast, autocast_dtype
from cpt.errors import ConfigError, CptError, DataError
from cpt.io import atomic_open, read_json, replace_dir
from cpt.layout import Layout
from cpt.params import section, stage_config
from cpt.progress import progress
from cpt.training import checkpoint, distributed, flops
from cpt.training.data import ReplaySampler, ShardSplit, eval_rows, open_shards
from cpt.training.embeddings import calibrate_new_logits, extend_embeddings
from cpt.training.loss import CausalLMLoss
from cpt.training.optim import build_optimizer, set_lr
from cpt.training.schedule import SCHEDULES, lr_at
from cpt.training.step import NonFiniteLoss, evaluate, train_step

log = logging.getLogger("cpt.train")

DEFAULTS: dict[str, Any] = {
    "steps": 80,
    "micro_batch": 8,
    "grad_accum": 1,
    "lr": 2.0e-3,
    "min_lr": 2.0e-4,
    "warmup": 0.05,
    "schedule": "cosine",
    "decay_fraction": 0.2,
    "embed_lr_mult": 1.0,
    "embed_only_steps": 0,
    "weight_decay": 0.1,
    "betas": [0.9, 0.95],
    "grad_clip": 1.0,
    "replay_ratio": 0.25,
    "embed_init": "subtoken_mean",
    "new_token_mass": 0.01,
    "eval_interval": 20,
    "eval_blocks": 32,
    "ckpt_interval": 20,
    "keep_checkpoints": 2,
    "resume": True,  # true | force | false
    "parallel": "ddp",
    "device": "auto",
    "dtype": "auto",
    "compile": False,
    "activation_checkpointing": False,
    "loss_chunk": 4096,
    "peak_tflops": None,
    "log_interval": 10,
    "trust_remote_code": False,
    "threads": None,
}
# Keys that ``resume: force`` may change between a checkpoint and its continuation (a warning says the run is no longer
# the uninterrupted one). Any other change (batch, data mix, init, seed, model) makes continuing meaningless.
RESUME_SAFE = {"steps", "lr", "min_lr", "warmup", "schedule", "decay_fraction", "embed_lr_mult", "embed_only_steps",
               "weight_decay", "betas", "grad_clip"}
# Keys that never affect the trajectory.
NOT_TRAJECTORY = {"eval_interval", "eval_blocks", "ckpt_interval", "keep_checkpoints", "resume", "parallel", "device",
                  "compile", "activation_checkpointing", "loss_chunk", "peak_tflops", "log_interval",
                  "trust_remote_code", "dtype", "threads"}
CURVE_FIELDS = ["step", "tokens", "lr", "loss_new", "loss_old", "bpb_new", "bpb_old", "train_loss"]
LN2 = math.log(2.0)


class TrainingDiverged(CptError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def config(params: dict) -> dict[str, Any]:
    cfg = stage_config(params, "train", DEFAULTS)
    for key in ("steps", "micro_batch", "grad_accum", "eval_interval", "ckpt_interval", "log_interval", "loss_chunk"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"params.yaml: train.{key}={cfg[key]!r} must be an integer >= 1")
    if not 0.0 <= float(cfg["replay_ratio"]) <= 1.0:
        raise ConfigError(f"params.yaml: train.replay_ratio={cfg['replay_ratio']} must be in [0, 1]")
    if not 0.0 <= float(cfg["warmup"]) < 1.0:
        raise ConfigError(f"params.yaml: train.warmup={cfg['warmup']} is a fraction of steps, in [0, 1)")
    if cfg["schedule"] not in SCHEDULES:
        raise ConfigError(f"params.yaml: train.schedule={cfg['schedule']!r}: expected one of {SCHEDULES}")
    if float(cfg["min_lr"]) > float(cfg["lr"]):
        raise ConfigError(f"params.yaml: train.min_lr={cfg['min_lr']} > train.lr={cfg['lr']}")
    if cfg["resume"] not in (True, False, "force"):
        raise ConfigError(f"params.yaml: train.resume={cfg['resume']!r}: expected true, false or force")
    if not 0 <= int(cfg["embed_only_steps"]) < cfg["steps"]:
        raise ConfigError(f"params.yaml: train.embed_only_steps={cfg['embed_only_steps']} must be in [0, steps)")
    return cfg


def fingerprint_items(cfg: dict, seed: int, shards_meta: dict, base_config: dict) -> dict[str, Any]:
    items = {k: v for k, v in cfg.items() if k not in NOT_TRAJECTORY}
    items["seed"] = seed
    items["shards"] = hashlib.sha256(json.dumps(shards_meta, sort_keys=True).encode()).hexdigest()[:16]
    items["base"] = hashlib.sha256(json.dumps(base_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return items


def lr_for(step: int, cfg: dict) -> float:
    """LR at optimizer step ``step``; the embeddings-only phase is a run of its own with its own warmup/decay."""
    phase0 = int(cfg["embed_only_steps"])
    if step < phase0:
        s, total = step, phase0
    else:
        s, total = step - phase0, cfg["steps"] - phase0
    return lr_at(s, max_lr=float(cfg["lr"]), min_lr=float(cfg["min_lr"]), total_steps=total,
                 warmup_steps=int(round(float(cfg["warmup"]) * total)), schedule=cfg["schedule"],
                 decay_steps=max(1, int(round(float(cfg["decay_fraction"]) * total))))


def to_xy(blocks: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = blocks.to(device, non_blocking=True)
    return blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


def eval_batches(split: ShardSplit, rows: np.ndarray, micro_batch: int, device: torch.device):
    for i in range(0, len(rows), micro_batch):
        yield to_xy(split.rows(rows[i : i + micro_batch]), device)


def bpb(loss_nats: float, split: ShardSplit | None) -> float:
    """Bits per byte from the mean token loss and the split's bytes per token."""
    if split is None or not math.isfinite(split.bytes_per_token):
        return float("nan")
    return loss_nats / split.bytes_per_token / LN2


def write_curve(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None or (isinstance(row.get(k), float) and not math.isfinite(row[k]))
                             else row[k]) for k in CURVE_FIELDS})
    with atomic_open(path) as fh:
        fh.write(buf.getvalue())


def export_model(core: torch.nn.Module, hf_model: torch.nn.Module, tokenizer_dir: Path, out: Path,
                 save_dtype: torch.dtype, info: distributed.DistInfo) -> None:
    """Write ``out`` as an HF folder (safetensors + the extended tokenizer), atomically (temp folder + rename)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=info.enabled)
    full = get_model_state_dict(core, options=opts)  # collective under FSDP
    if not info.main:
        return
    prefix = "model."
    state = {k[len(prefix):]: v.to(save_dtype) for k, v in full.items() if k.startswith(prefix)}
    # A tied head is one tensor under two names; gathered state dicts can hold two copies, which save_pretrained
    # would then write twice (and as untied). Keep each parameter's first name only.
    first: dict[int, str] = {}
    for name, p in hf_model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    dupes = {name for name, p in hf_model.named_parameters(remove_duplicate=False) if first[id(p)] != name}
    state = {k: v for k, v in state.items() if k not in dupes}
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_model.config.dtype = save_dtype
    hf_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    for f in sorted(tokenizer_dir.iterdir()):
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, out)


def run(params: dict, layout: Layout) -> dict:
    cfg = config(params)
    seed = int(params.get("seed", 0))
    info, device = distributed.setup(cfg["device"])
    deterministic_before, threads_before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)  # CPU runs are bit-reproducible (exact resume is tested there)
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _train(cfg, seed, layout, info, device, given=set(section(params, "train")))
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.set_num_threads(threads_before)
        distributed.teardown(info)


def _train(cfg: dict, seed: int, layout: Layout, info: distributed.DistInfo, device: torch.device,
           given: set[str] = frozenset()) -> dict:
    from transformers import AutoModelForCausalLM

    # ---- inputs ------------------------------------------------------------------------------------------------
    for path, stage in ((layout.base / "config.json", "base"), (layout.tokenizer / "new_tokens.json", "tokenizer")):
        if not path.exists():
            raise DataError(f"{path}: not found; run `cpt {stage}` first")
    new_tokens = read_json(layout.tokenizer / "new_tokens.json")
    shards = open_shards(layout.shards)
    if shards.vocab_size > int(new_tokens["vocab"]):
        raise DataError(f"{layout.shards}/meta.json: vocab_size {shards.vocab_size} > the tokenizer's "
                        f"{new_tokens['vocab']} ({layout.tokenizer}/new_tokens.json): shards from another tokenizer?")
    train_new, train_old = shards.split("new/train"), shards.split("old/train")
    val = {"new": shards.split("new/val"), "old": shards.split("old/val")}
    block = shards.block_size
    amp_dtype = autocast_dtype(device, cfg["dtype"])
    global_batch = cfg["micro_batch"] * cfg["grad_accum"] * info.world_size
    tokens_per_step = global_batch * (block - 1)

    # ---- checkpoints: resume, finished, or fresh -----------------------------------------------------------------
    ckdir = layout.checkpoints
    base_config = read_json(layout.base / "config.json")
    fp = fingerprint_items(cfg, seed, shards.meta, base_config)
    newest = checkpoint.latest(ckdir)
    start_over = None
    if newest is not None and not cfg["resume"]:
        start_over = "train.resume=false"
    elif newest is not None:
        changed = _changed(checkpoint.read_state(newest).get("fingerprint", {}), fp)
        if changed and cfg["resume"] == "force":
            _check_forceable(newest, changed)
        elif changed:
            start_over = f"{newest} was made with other params ({_describe(changed)})"
    if info.main:
        ckdir.mkdir(parents=True, exist_ok=True)
        checkpoint.sweep_temp(ckdir)
        if start_over:
            log.warning("%s: removing the checkpoints in %s and training from scratch", start_over, ckdir)
            checkpoint.clear(ckdir)
    if info.enabled:
        torch.distributed.barrier()
    resume_from = None if start_over else newest
    state: dict[str, Any] = {}
    if resume_from is not None:
        state = checkpoint.read_state(resume_from)

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    # ---- model: load, resize, initialise new rows ----------------------------------------------------------------
    hf_model = AutoModelForCausalLM.from_pretrained(layout.base, dtype=torch.float32,
                                                    trust_remote_code=bool(cfg["trust_remote_code"]))
    save_dtype = _config_dtype(base_config)
    rows_before = hf_model.get_input_embeddings().weight.shape[0]
    core = CausalLMLoss(hf_model, chunk_size=cfg["loss_chunk"]).to(device)
    old_rows = _resize_probe_rows(val["old"], cfg["eval_blocks"], rows_before)
    if not state:
        old_before = _mean_loss(core, val["old"], old_rows, cfg["micro_batch"], device, amp_dtype)
    embed_report = extend_embeddings(hf_model, new_tokens, cfg["embed_init"], seed)
    core.to(device)
    if not state:
        if cfg["new_token_mass"]:
            embed_report.update(calibrate_new_logits(
                hf_model, _calibration_blocks(train_old).to(device),
                int(new_tokens["base_vocab"]), float(cfg["new_token_mass"])))
        old_after = _mean_loss(core, val["old"], old_rows, cfg["micro_batch"], device, amp_dtype)
        change = (old_after - old_before) / old_before if old_before and math.isfinite(old_before) else float("nan")
        log.info("old-domain val loss before resize %.4f, after %.4f (%+.2f%%, %d blocks; init %s)",
                 old_before, old_after, 100 * change, len(old_rows), cfg["embed_init"])
        state = {"step": 0, "samples": 0, "tokens": 0, "train_seconds": 0.0, "curve": [], "finished": False,
                 "resize": {**embed_report, "old_loss_before": old_before, "old_loss_after": old_after,
                            "old_loss_change": change, "probe_blocks": len(old_rows)}}
    n_params = flops.count_params(hf_model)
    layers, width = flops.model_shape(hf_model.config)
    per_token = flops.flops_per_token(n_params, layers, width, block - 1)

    # ---- parallelism, compile, optimizer -------------------------------------------------------------------------
    if cfg["activation_checkpointing"]:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg["compile"]:
        if cfg["parallel"] == "fsdp" and info.enabled:
            for blk in hf_model.modules():
                if isinstance(blk, distributed.block_classes(hf_model)):
                    blk.compile()
        else:
            core.compile()  # in place: the state-dict keys stay the model's
    model = distributed.wrap(core, hf_model, cfg["parallel"], info, device, amp_dtype)
    optimizer = build_optimizer(hf_model, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]),
                                betas=tuple(cfg["betas"]), embed_lr_mult=float(cfg["embed_lr_mult"]))
    clip_params = [p for g in optimizer.param_groups for p in g["params"]]
    if resume_from is not None:
        state = checkpoint.load(resume_from, core, optimizer)
        log.info("resuming from %s (step %d of %d, %d samples)", resume_from, state["step"], cfg["steps"],
                 state["samples"])

    # ---- a finished run is re-exported, not retrained ------------------------------------------------------------
    if state["step"] > cfg["steps"]:
        raise ConfigError(f"{resume_from}: the checkpoint is at step {state['step']}, past train.steps="
                          f"{cfg['steps']}; raise train.steps or use train.resume=false")
    if state.get("finished") and state["step"] == cfg["steps"]:
        log.info("%s is the final checkpoint of this run (step %d): re-exporting %s without training "
                 "(set train.resume=false to retrain)", resume_from, state["step"], layout.model)
        if info.main:  # dvc repro deletes the stage's outputs first: the curve comes back with the model
            write_curve(layout.metrics / "train_curve.csv", state["curve"])
        export_model(core, hf_model, layout.tokenizer, layout.model, save_dtype, info)
        return {**state["metrics"], "retrained": False, "resumed_from": state["step"]}

    # ---- the loop ------------------------------------------------------------------------------------------------
    sampler = ReplaySampler(train_new, train_old, float(cfg["replay_ratio"]), seed)
    eval_sets = {d: eval_rows(val[d], cfg["eval_blocks"], info.world_size) for d in ("new", "old")}
    peak = flops.peak_flops(device, cfg["peak_tflops"])
    tracker = tracking.current()
    if info.main:
        # params.yaml's own keys are logged by the tracker; add the defaults this run used and the model size
        tracker.log_params({f"train.{k}": v for k, v in cfg.items() if k not in given} | {"train.n_params": n_params})
    step_log = ckdir / "steps.jsonl"
    if info.main:
        _truncate_step_log(step_log, state["step"])
    start_step = state["step"]
    samples, tokens, train_seconds = state["samples"], state["tokens"], state["train_seconds"]
    curve: list[dict] = state["curve"]

    def do_eval(step: int, lr: float, train_loss: float | None) -> dict:
        row: dict[str, Any] = {"step": step, "tokens": tokens, "lr": lr, "train_loss": train_loss}
        core.eval()
        for d in ("new", "old"):
            split = val[d]
            rows = eval_sets[d]
            shard_rows = rows[info.rank :: info.world_size]
            if split is None or len(rows) == 0:
                row[f"loss_{d}"] = row[f"bpb_{d}"] = float("nan")
                continue
            total, n = evaluate(model, eval_batches(split, shard_rows, cfg["micro_batch"], device),
                                device=device, amp_dtype=amp_dtype)
            row[f"loss_{d}"] = total / n
            row[f"bpb_{d}"] = bpb(total / n, split)
        core.train()
        return row

    def save(step: int, finished: bool, metrics: dict | None = None) -> None:
        payload = {"samples": samples, "tokens": tokens, "train_seconds": train_seconds, "curve": curve,
                   "finished": finished, "resize": state["resize"], "fingerprint": fp,
                   "world_size": info.world_size, "metrics": metrics}
        checkpoint.save(ckdir, step, core, optimizer, payload, keep=int(cfg["keep_checkpoints"]))

    if not curve:  # the resized model, before any update: where both curves start
        curve.append(do_eval(0, 0.0, None))
    core.train()
    bar = progress(total=cfg["steps"], initial=start_step, desc="train", unit="step", **({} if info.main else {"disable": True}))
    last_good = resume_from
    train_loss = float("nan")
    lr = 0.0
    for step in range(start_step, cfg["steps"]):
        lr = lr_for(step, cfg)
        set_lr(optimizer, lr)
        micro, is_old = [], []
        for m in range(cfg["grad_accum"]):
            first = samples + (m * info.world_size + info.rank) * cfg["micro_batch"]
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
        train_seconds += dt
        samples += global_batch
        tokens += tokens_per_step
        train_loss = result.loss
        dom = _domain_losses(result.token_losses, is_old, device)
        tps = tokens_per_step / dt
        record = {"step": step + 1, "loss": train_loss, "loss/new": dom["new"], "loss/old": dom["old"],
                  "bpb/new": bpb(dom["new"], train_new), "bpb/old": bpb(dom["old"], train_old), "lr": lr,
                  "grad_norm": result.grad_norm, "tokens_per_s": tps,
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
            row = do_eval(step + 1, lr, train_loss)
            curve.append(row)
            if info.main:
                tracker.log_metrics({f"val_{k.replace('_', '/')}": row[k] for k in
                                     ("loss_new", "loss_old", "bpb_new", "bpb_old") if math.isfinite(row[k])},
                                    step=step + 1)
                write_curve(layout.metrics / "train_curve.csv", curve)
        if (step + 1) % cfg["ckpt_interval"] == 0 and not done:
            save(step + 1, finished=False)
            last_good = checkpoint.step_dir(ckdir, step + 1)
    bar.close()

    # ---- outputs -------------------------------------------------------------------------------------------------
    final = curve[-1]
    tokens_per_s = tokens / train_seconds if train_seconds else 0.0
    resize = state["resize"]
    metrics = {
        "steps": cfg["steps"], "tokens": tokens, "tokens_per_s": tokens_per_s,
        "mfu": flops.mfu(tokens_per_s, per_token, peak, info.world_size),
        "train_seconds": train_seconds, "loss_new": final["loss_new"], "loss_old": final["loss_old"],
        "bpb_new": final["bpb_new"], "bpb_old": final["bpb_old"], "train_loss": train_loss,
        "old_loss_before_resize": resize["old_loss_before"], "old_loss_after_resize": resize["old_loss_after"],
        "old_loss_resize_change": resize["old_loss_change"], "embeddings": {k: resize.get(k) for k in
        ("vocab", "base_vocab", "rows_before", "rows_after", "added", "init", "init_fallback", "tied",
         "new_logit_shift", "new_mass_before", "new_mass_after")},
        "params": n_params, "flops_per_token": per_token, "world_size": info.world_size, "device": device.type,
        "replay_ratio": float(cfg["replay_ratio"]), "epochs": sampler.epochs(samples),
        "resumed_from": start_step or None, "retrained": True,
    }
    if info.main:
        write_curve(layout.metrics / "train_curve.csv", curve)
    save(cfg["steps"], finished=True, metrics=metrics)
    export_model(core, hf_model, layout.tokenizer, layout.model, save_dtype, info)
    return metrics


def _changed(saved: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def _describe(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())


def _check_forceable(path: Path, changed: dict[str, tuple[Any, Any]]) -> None:
    unsafe = {k: v for k, v in changed.items() if k not in RESUME_SAFE}
    if unsafe:
        raise ConfigError(f"{path}: train.resume=force cannot continue a checkpoint made with other "
                          f"{_describe(unsafe)}: that would mix two runs. Use train.resume=true to start over")
    log.warning("train.resume=force: continuing %s with changed params (%s); the result is not an uninterrupted "
                "run's", path, _describe(changed))


def _config_dtype(base_config: dict) -> torch.dtype:
    name = base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def _resize_probe_rows(split: ShardSplit | None, max_blocks: int, rows_before: int) -> np.ndarray:
    """Old-domain val blocks the BASE model can read (every id < its embedding rows): the before/after-resize
    comparison needs the same blocks on both sides."""
    if split is None:
        return np.zeros(0, dtype=np.int64)
    rows = eval_rows(split, max_blocks)
    return np.array([i for i in rows if int(split.blocks[i].max()) < rows_before], dtype=np.int64)


def _calibration_blocks(split: ShardSplit | None) -> torch.Tensor:
    """A few old-domain TRAIN blocks (spread over the split, ~2k tokens) for calibrate_new_logits; inputs only."""
    if split is None or split.n_blocks == 0:
        return torch.zeros((0, 1), dtype=torch.long)
    n = min(split.n_blocks, max(1, 2048 // split.blocks.shape[1]))
    return split.rows(np.linspace(0, split.n_blocks - 1, n).round().astype(np.int64))[:, :-1]


def _mean_loss(core, split, rows, micro_batch, device, amp_dtype) -> float:
    if split is None or len(rows) == 0:
        return float("nan")
    core.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(split, rows, micro_batch, device):
            with autocast(device, amp_dtype):
                s, _ = core(x, y)
            total += float(s)
            n += y.numel()
    core.train()
    return total / n


def _domain_losses(token_losses: list[torch.Tensor], is_old: list[torch.Tensor], device) -> dict[str, float]:
    """Mean train loss per domain over the global batch (sums and counts all-reduced)."""
    stats = torch.zeros(4, dtype=torch.float64, device=device)
    for losses, old in zip(token_losses, is_old):
        per_row = losses.double().sum(dim=1)
        old = old.to(device)
        stats[0] += per_row[~old].sum()
        stats[1] += (~old).sum() * losses.shape[1]
        stats[2] += per_row[old].sum()
        stats[3] += old.sum() * losses.shape[1]
    distributed.all_reduce_sum(stats)
    s = stats.tolist()
    return {"new": s[0] / s[1] if s[1] else float("nan"), "old": s[2] / s[3] if s[3] else float("nan")}


def _truncate_step_log(path: Path, step: int) -> None:
    """Keep only the steps the checkpoint we resume from has seen: a killed run logged steps past it."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    with atomic_open(path) as fh:
        fh.write("".join(line + "\n" for line in keep))
