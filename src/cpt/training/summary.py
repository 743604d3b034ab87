"""The run's summary: ``metrics/train.json``'s fields from the final eval row, the resize report and the timings."""

from __future__ import annotations

from typing import Any

import torch

from cpt.training import flops
from cpt.training.data import ReplaySampler


def per_language(row: dict[str, Any]) -> dict[str, float]:
    """``{lang: bpb}`` from an eval row's ``bpb_<domain>_<lang>`` (``<lang>_<domain>`` if a language is in both)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k[:8] in ("bpb_new_", "bpb_old_"):
            out[k[8:] if k[8:] not in out else f"{k[8:]}_{k[4:7]}"] = v
    return out


def final_metrics(cfg: dict, state, start_step: int, train_loss: float, sampler: ReplaySampler,
                  per_token: float, peak: float | None, n_params: int, info, device: torch.device) -> dict[str, Any]:
    final, resize = state.curve[-1], state.resize
    tokens_per_s = state.tokens / state.train_seconds if state.train_seconds else 0.0
    return {
        "steps": cfg["steps"], "tokens": state.tokens, "tokens_per_s": tokens_per_s,
        "mfu": flops.mfu(tokens_per_s, per_token, peak, info.world_size),
        "train_seconds": state.train_seconds, "loss_new": final["loss_new"], "loss_old": final["loss_old"],
        "bpb_new": final["bpb_new"], "bpb_old": final["bpb_old"], "train_loss": train_loss,
        # exact bits per byte per language on val blocks spread over the split (compare eval's heldout_<lang>)
        "final_bpb": per_language(final),
        "old_loss_before_resize": resize["old_loss_before"], "old_loss_after_resize": resize["old_loss_after"],
        "old_loss_resize_change": resize["old_loss_change"], "embeddings": {k: resize.get(k) for k in
        ("vocab", "base_vocab", "rows_before", "rows_after", "added", "init", "init_fallback", "tied",
         "new_logit_shift", "new_mass_before", "new_mass_after", "calibration_skipped")},
        "params": n_params, "flops_per_token": per_token, "world_size": info.world_size, "device": device.type,
        "replay_ratio": float(cfg["replay_ratio"]), "epochs": sampler.epochs(state.samples),
        "resumed_from": start_step or None, "retrained": True,
    }
