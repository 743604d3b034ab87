"""Model FLOPs utilisation: useful training FLOPs per second over the GPU's bf16 matmul peak.

FLOPs per token = 6·N + 12·L·d·T (PaLM, Chowdhery et al. 2022, appendix B): 6N for the forward + backward matmuls
over the N parameters that take part in a matmul, 12·L·d·T for attention scores and values over a T-token context.
N (``matmul_params``) is the PaLM convention: the non-embedding parameters plus the lm_head. The input embedding is a
table lookup, not a matmul, so it is not counted; the lm_head is a (vocab x d) matmul and is counted, tied to the
embedding or not. Counting the embedding too overstated the demo model's MFU 1.7x (a 4.8M-row-parameter extended
vocabulary on a 3.2M model) and a 1B model's with a 45k vocabulary by ~8%. Recomputation from activation
checkpointing is not useful work and is not counted.

The peak is measured (a large bf16 matmul, best of a few) unless configured: datasheet numbers (989 TFLOP/s dense
for an H100 SXM) are unreachable, so MFU against them flatters nobody; the measured ceiling says how far we are
from what the chip does on a matmul.
"""

from __future__ import annotations

import time

import torch
from torch import nn

_PEAK_CACHE: dict[str, float] = {}


def count_params(model: nn.Module) -> int:
    """Parameters, each shared tensor (a tied head) once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def matmul_params(model: nn.Module) -> int:
    """N of the PaLM convention: every parameter once, minus the embedding tables (input and, if any, positional:
    lookups), plus the lm_head (a matmul; its weight is the input embedding's when tied, still one matmul)."""
    total = count_params(model)
    tables = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding)}
    n = total - sum(tables.values())
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in tables:  # tied: the head's matmul runs on the embedding table
        n += head.weight.numel()
    return n


def flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    return 6.0 * n_params + 12.0 * n_layers * d_model * seq_len


def model_shape(config) -> tuple[int, int]:
    """(layers, width) from an HF config (Llama/Mistral/Qwen names, GPT-2 names)."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    return int(layers), int(width)


def measure_peak_flops(device: torch.device, n: int = 8192, iters: int = 10) -> float | None:
    """bf16 matmul FLOP/s on ``device`` (None on CPU: MFU there means nothing)."""
    if device.type != "cuda":
        return None
    key = str(device)
    if key not in _PEAK_CACHE:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(iters):
                a @ b
            torch.cuda.synchronize(device)
            best = min(best, (time.perf_counter() - t0) / iters)
        _PEAK_CACHE[key] = 2.0 * n**3 / best
        del a, b
    return _PEAK_CACHE[key]


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    if device.type != "cuda":
        return None
    if configured_tflops:
        return float(configured_tflops) * 1e12
    return measure_peak_flops(device)


def mfu(tokens_per_s: float, per_token: float, peak: float | None, world_size: int = 1) -> float | None:
    """Fraction of ``world_size`` GPUs' peak that ``tokens_per_s`` (global) achieves."""
    if not peak:
        return None
    return tokens_per_s * per_token / (peak * world_size)
