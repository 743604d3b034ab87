"""Device and precision choice in one place: CUDA with bf16 autocast when available, else CPU in fp32."""

from __future__ import annotations

import contextlib

import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast_dtype(device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """The autocast dtype (None = plain fp32). bf16 on CUDA unless asked otherwise; CPU stays fp32 so CPU runs are
    bit-reproducible."""
    if requested == "fp32" or (requested == "auto" and device.type != "cuda"):
        return None
    if requested in ("auto", "bf16"):
        return torch.bfloat16
    if requested == "fp16":
        return torch.float16
    raise ValueError(f"unknown dtype {requested!r}; expected auto, bf16, fp16 or fp32")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
