"""AdamW with the parameter groups continual pretraining needs, and the per-step LR setter.

Three groups: the transformer's matrices (weight decay), its norms and biases (no decay), and the embeddings +
lm_head (their own LR multiplier, ``train.embed_lr_mult``, and no decay: decay would shrink the old rows toward zero
while they are barely trained). During the optional embeddings-only phase (``train.embed_only_steps``) the body's
gradients are dropped before the optimizer step, so AdamW skips those parameters entirely: their weights AND their
Adam moments stay exactly as they were, and the body starts its own warmup afterwards from a clean state.

Fused AdamW (one kernel over all parameters) on CUDA; the default foreach implementation on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

EMBED, DECAY, NO_DECAY = "embed", "decay", "no_decay"


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split ``model``'s trainable parameters (an HF causal LM, possibly inside a wrapper) into the three groups."""
    embed_ids = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        embed_ids.update(id(p) for p in head.parameters())
    groups: dict[str, list[nn.Parameter]] = {EMBED: [], DECAY: [], NO_DECAY: []}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embed_ids:
            groups[EMBED].append(p)
        elif p.ndim >= 2:
            groups[DECAY].append(p)
        else:
            groups[NO_DECAY].append(p)
    return groups


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8, embed_lr_mult: float = 1.0, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model)``. Call after FSDP sharding (the parameters are then DTensors)."""
    groups = param_groups(model)
    spec = [
        {"params": groups[DECAY], "weight_decay": weight_decay, "lr_mult": 1.0, "name": DECAY},
        {"params": groups[NO_DECAY], "weight_decay": 0.0, "lr_mult": 1.0, "name": NO_DECAY},
        {"params": groups[EMBED], "weight_decay": 0.0, "lr_mult": embed_lr_mult, "name": EMBED},
    ]
    spec = [g for g in spec if g["params"]]
    if fused is None:
        fused = all(p.is_cuda for g in spec for p in g["params"])
    return torch.optim.AdamW(spec, lr=lr, betas=betas, eps=eps, fused=fused or None)


def apply_hparams(optimizer: torch.optim.Optimizer, *, weight_decay: float, betas: tuple[float, float],
                  embed_lr_mult: float) -> None:
    """Set the run's hyperparameters on the groups ``build_optimizer`` made. Needed after loading a checkpoint:
    ``load_state_dict`` restores the saved groups' weight_decay, betas and lr_mult, so without this a
    ``train.resume: force`` with a new weight_decay would silently keep the old one."""
    for group in optimizer.param_groups:
        group["betas"] = tuple(betas)
        if group.get("name") == DECAY:
            group["weight_decay"] = weight_decay
        if group.get("name") == EMBED:
            group["lr_mult"] = embed_lr_mult


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def drop_body_grads(optimizer: torch.optim.Optimizer) -> None:
    """Embeddings-only phase: forget the body's gradients so AdamW leaves those parameters untouched."""
    for group in optimizer.param_groups:
        if group.get("name") != EMBED:
            for p in group["params"]:
                p.grad = None


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Global grad norm (clipped to ``max_norm`` if > 0). Works on plain, DDP and FSDP2 (DTensor) gradients."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)
