"""Give the extended vocabulary embeddings that do not hurt the old language.

``resize_token_embeddings(n, pad_to_multiple_of=64, mean_resizing=False)`` makes room (a multiple of 64 keeps the
embedding and head matmuls on tensor-core shapes); then every new row is set here, for the input embeddings and,
if the head is untied, for the lm_head:

- ``subtoken_mean`` (default): the mean of the base rows of the piece's ``base_ids`` (the base tokenizer's encoding
  of the new piece, from ``new_tokens.json``), the "interpolation" init of unsloth / NVIDIA NeMo. The new token starts
  out meaning what its spelling meant.
- ``mean``: the mean of all base rows (Hewitt 2021: bounds the KL between the old and the resized model).
- ``random``: normal(0, std of the base rows), seeded; for ablations only.

Rows that no token uses (the padding up to the multiple of 64) always get the all-rows mean: they are never a target,
and the mean keeps the probability they steal near 1/V each.

Two traps are checked, not assumed: an untied head whose old rows were re-initialised during the resize (a known
transformers bug class: post_init re-running on the new head), and a tied head that came out untied. The old rows
are put back from a copy taken before the resize, and tying is re-done.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cpt.errors import ConfigError, DataError
from cpt.training.loss import logit_scale

log = logging.getLogger("cpt.stages.train")

INITS = ("subtoken_mean", "mean", "random")


def padded(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def is_tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


@torch.no_grad()
def init_rows(weight: torch.Tensor, old: torch.Tensor, base_rows: int, added: list[dict], init: str,
               gen: torch.Generator) -> int:
    """Fill rows ``base_rows..`` of ``weight`` from ``old`` (the pre-resize rows); returns fallback count."""
    real = old[:base_rows].float()
    mean = real.mean(0)
    weight[old.shape[0]:] = mean.to(weight.dtype)  # padding (and any unlisted id): all-rows mean
    fallback = 0
    for tok in added:
        i = int(tok["id"])
        if init == "random":
            row = torch.randn(real.shape[1], generator=gen) * real.std()
        elif init == "mean":
            row = mean
        else:
            ids = [b for b in tok.get("base_ids", []) if 0 <= int(b) < base_rows]
            if not ids:
                fallback += 1
                row = mean
            else:
                row = real[torch.tensor(ids, dtype=torch.long)].mean(0)
        weight[i] = row.to(weight.dtype)
    return fallback


def check_new_tokens(new_tokens: dict, old_rows: int, init: str) -> list[dict]:
    """Validate ``new_tokens.json`` against the base's ``old_rows`` embedding rows; returns its ``added`` list."""
    if init not in INITS:
        raise ConfigError(f"train.embed_init={init!r}: expected one of {INITS}")
    vocab = int(new_tokens["vocab"])
    base_vocab = int(new_tokens["base_vocab"])
    added = list(new_tokens.get("added", []))
    if base_vocab > old_rows:
        raise DataError(f"new_tokens.json: base_vocab {base_vocab} > the base model's {old_rows} embedding rows")
    for tok in added:
        if not base_vocab <= int(tok["id"]) < vocab:
            raise DataError(f"new_tokens.json: added id {tok['id']} outside [base_vocab {base_vocab}, vocab {vocab})")
    return added


def extend_embeddings(model: nn.Module, new_tokens: dict, init: str = "subtoken_mean", seed: int = 0) -> dict:
    """Resize ``model`` to ``new_tokens['vocab']`` padded to 64 and initialise the new rows. Returns a report."""
    vocab = int(new_tokens["vocab"])
    base_vocab = int(new_tokens["base_vocab"])
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    added = check_new_tokens(new_tokens, old_rows, init)
    tied = is_tied(model)
    head = None if tied else model.get_output_embeddings()
    old_in = emb.weight.detach().clone()
    old_out = head.weight.detach().clone() if head is not None else None

    target = max(vocab, old_rows)
    model.resize_token_embeddings(target, pad_to_multiple_of=64, mean_resizing=False)
    emb = model.get_input_embeddings()
    rows = emb.weight.shape[0]
    restored = False
    with torch.no_grad():
        if not torch.equal(emb.weight[:old_rows], old_in):
            emb.weight[:old_rows] = old_in
            restored = True
        if tied and not is_tied(model):
            log.warning("resize untied a tied lm_head; re-tying")
            model.tie_weights()
        head = None if tied else model.get_output_embeddings()
        if head is not None:
            if head.weight.shape[0] != rows:
                raise DataError(f"lm_head has {head.weight.shape[0]} rows after resize, embeddings {rows}")
            if not torch.equal(head.weight[:old_rows], old_out):
                log.warning("resize re-initialised the untied lm_head's old rows; restoring them")
                head.weight[:old_rows] = old_out
                restored = True

    # Seeded per matrix so `random` is deterministic and the two matrices differ.
    fallback = init_rows(emb.weight, old_in, base_vocab, added, init, torch.Generator().manual_seed(seed))
    if head is not None:
        init_rows(head.weight, old_out, base_vocab, added, init, torch.Generator().manual_seed(seed + 1))
    if fallback:
        log.warning("%d new tokens had no usable base_ids; they got the all-rows mean", fallback)
    return {
        "vocab": vocab,
        "base_vocab": base_vocab,
        "rows_before": old_rows,
        "rows_after": rows,
        "added": len(added),
        "init": init,
        "init_fallback": fallback,
        "tied": tied,
        "old_rows_restored": restored,
    }


@torch.no_grad()
def calibrate_new_logits(model: nn.Module, blocks: torch.Tensor, base_vocab: int, target_mass: float) -> dict:
    """Move every new head row by the same vector ``delta * d`` until, in old-domain contexts, the new rows together
    take at most ``target_mass`` of the probability. Returns a report.

    Why: a sub-token-mean row predicts its piece about as strongly as its sub-tokens on average. Right for one new
    token, wrong for twenty thousand: on the 4k-vocab demo base with 21k new pieces, the new rows took 33% of the
    probability on English text and the old-domain loss rose 6% (the issue's goal is 1%).

    ``d`` is the direction the base itself learned for "never predict this": the mean of the head rows of the old
    tokens least predicted on old-domain contexts, minus the mean of all old rows. Measured on the demo base,
    ``h . d < 0`` at every position, so adding ``delta * d`` lowers every new logit everywhere (``delta = 2`` took the
    old-domain loss change from +5.9% to +0.09%; the 1% default target gives +0.15%). It is the same vector for every new row, so at any position the new
    tokens keep their order among themselves (what the sub-token means encode); only their total share against the
    old tokens moves. ``delta`` is found by bisection on a few old-domain TRAIN blocks (never val: the before/after
    report is measured there). Training raises the logits of the pieces the new language uses. Hand-written: the
    product's own init step, no library has it.
    """
    head = model.get_output_embeddings()
    if head is None or blocks.numel() == 0 or not target_mass or head.weight.shape[0] <= base_vocab:
        return {"new_logit_shift": 0.0}
    if is_tied(model):
        # One matrix is both the head and the input embedding: shifting the new head rows would move the new INPUT
        # rows off their sub-token-mean init too. They stay at their init (the report says calibration was skipped).
        why = "tied head: shifting the new head rows would move the new input rows too"
        log.warning("new-row calibration skipped (%s)", why)
        return {"new_logit_shift": 0.0, "calibration_skipped": why}
    device = head.weight.device
    h = model.base_model(input_ids=blocks.to(device), use_cache=False)[0]
    h = h.reshape(-1, head.weight.shape[1]).float() * logit_scale(model.config)
    w = head.weight.float()
    old_logits = h @ w[:base_vocab].t()
    old_lse = torch.logsumexp(old_logits, dim=-1)
    least = torch.softmax(old_logits, dim=-1).mean(0).argsort()[: max(16, base_vocab // 16)]
    d = w[least].mean(0) - w[:base_vocab].mean(0)
    new_logits = h @ w[base_vocab:].t()
    hd = h @ d  # each position's logit change per unit of delta (negative where d works)

    def mass(delta: float) -> float:
        new_lse = torch.logsumexp(new_logits + delta * hd[:, None], dim=-1)
        return float(torch.sigmoid(new_lse - old_lse).mean())  # e^new / (e^old + e^new), averaged

    before = mass(0.0)
    delta = 0.0
    if before > target_mass:
        hi = 1.0
        while mass(hi) > target_mass and hi < 1024:
            hi *= 2
        if mass(hi) > target_mass:
            log.warning("new-row calibration: the base gives no direction that lowers every new logit; skipped")
            return {"new_logit_shift": 0.0, "new_mass_before": before, "new_mass_after": before}
        lo = 0.0
        for _ in range(20):  # |hi - lo| < hi / 1e6
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mass(mid) > target_mass else (lo, mid)
        delta = hi
        head.weight[base_vocab:] += (delta * d).to(head.weight.dtype)
    return {"new_logit_shift": delta, "new_mass_before": before, "new_mass_after": mass(delta)}
