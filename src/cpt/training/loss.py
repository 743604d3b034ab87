"""Causal-LM loss without the full logits tensor.

At vocab 40k and 16k tokens per micro-batch, ``model(...).logits`` in fp32 is 2.6 GB, plus its softmax and its
gradient: the single largest activation of a 1B model, and pure memory traffic. ``linear_cross_entropy`` computes
``lm_head`` + cross-entropy chunk by chunk and, while each chunk's logits are live, also the gradient of the loss
with respect to the hidden states and the head weight (the "fused linear cross-entropy" of Liger-Kernel / Apple's
cut-cross-entropy, written here in plain torch so it runs on CPU and under torch.compile with no extra package).
Backward then only scales the stored gradients. Hand-written because it is measurably faster and smaller than
materialising logits (bench/bench_train_gpu.py).

``CausalLMLoss`` wraps any HF ``*ForCausalLM`` so that ``forward(input_ids, targets)`` returns the summed token loss
and the per-token losses (``vocab_limit``: score over the first rows of the head only, i.e. as the base model before
the vocabulary extension). It is the module that DDP / FSDP / torch.compile wrap, so one forward = one graph.

Targets equal to ``IGNORE_INDEX`` (-100, torch's convention) add no loss and no gradient: the sft stage trains on
assistant tokens only. ``position_ids`` (optional) reach the model: sft packs several conversations into one row
with positions restarting at 0, from which transformers builds the block-diagonal attention mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i); gradients computed in forward, one chunk of logits at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, compute_dtype, with_grad: bool):  # type: ignore[override]
        n = hidden.shape[0]
        h_all = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if with_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        valid_all = targets != IGNORE_INDEX
        safe_targets = targets.clamp_min(0)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            h = h_all[start:end]
            tgt = safe_targets[start:end]
            valid = valid_all[start:end]
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            losses[start:end] = (lse - logits.gather(1, tgt[:, None]).squeeze(1)).masked_fill(~valid, 0.0)
            if with_grad:
                # d(sum CE)/d logits = softmax - onehot, formed in place over the chunk's logits. Ignored rows are
                # zeroed on the (chunk, d) side, never on the (chunk, vocab) logits: masking costs O(chunk x d).
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(end - start, device=probs.device), tgt] -= 1.0
                g = probs.to(compute_dtype)
                keep = valid.to(compute_dtype)[:, None]
                grad_h[start:end] = ((g @ w) * keep).to(hidden.dtype)  # type: ignore[index]
                grad_w += (g.t() @ (h * keep)).float()  # type: ignore[operator]
        if with_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))  # type: ignore[union-attr]
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total, grad_w * grad_total, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 4096,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, per-token losses fp32) for ``hidden (N, d)``, ``weight (V, d)``, ``targets (N,)``."""
    if compute_dtype is None:
        device = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, compute_dtype, with_grad)


def logit_scale(config) -> float:
    """The factor a family applies to ``hidden @ W.T`` before the softmax: Granite divides by ``logits_scaling``,
    Cohere multiplies by ``logit_scale``; 1.0 for everyone else. The fused loss must apply it or it trains a
    different model than the one HF (and eval) runs."""
    scale = 1.0
    div = getattr(config, "logits_scaling", None)
    if isinstance(div, (int, float)) and div not in (0, 1):
        scale /= float(div)
    mul = getattr(config, "logit_scale", None)
    if isinstance(mul, (int, float)) and not isinstance(mul, bool) and mul != 1:
        scale *= float(mul)
    return scale


class CausalLMLoss(nn.Module):
    """``forward(input_ids (B, T), targets (B, T), position_ids=None) -> (loss_sum, token_losses (B, T))`` for an HF
    causal LM; IGNORE_INDEX targets count 0."""

    def __init__(self, model: nn.Module, chunk_size: int = 4096, fused: bool = True):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        head = model.get_output_embeddings()
        # The fused path needs logits = hidden @ W.T exactly; heads with a bias or logit soft-capping (Gemma 2)
        # go through the model's own logits instead.
        softcap = getattr(model.config, "final_logit_softcapping", None)
        self.fused = fused and isinstance(head, nn.Linear) and head.bias is None and not softcap
        self.logit_scale = logit_scale(model.config)
        self.vocab_limit: int | None = None

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states (B, T, d), for the new-row calibration (cpt.training.sharded registers it as an
        FSDP forward method, so every layer gathers its shards as in ``forward``)."""
        return self.model.base_model(input_ids=input_ids, use_cache=False)[0]


    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
            head = self.model.get_output_embeddings()
            weight = head.weight if self.vocab_limit is None else head.weight[: self.vocab_limit]
            if self.logit_scale != 1.0:  # (s * h) @ W.T = s * logits: the scale rides on the hidden states
                hidden = hidden * self.logit_scale
            total, losses = linear_cross_entropy(
                hidden.flatten(0, 1), weight, targets.flatten(), chunk_size=self.chunk_size
            )
        else:
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            if self.vocab_limit is not None:
                logits = logits[..., : self.vocab_limit]
            losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none",
                                     ignore_index=IGNORE_INDEX)
            total = losses.sum()
            losses = losses.detach()
        return total, losses.view_as(targets)
