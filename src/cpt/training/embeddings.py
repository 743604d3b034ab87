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

log = logging.getLogger("cpt.train")

INITS = ("subtoken_mean", "mean", "random")


def padded(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def is_tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


@torch.no_grad()
def _init_rows(weight: torch.Tensor, old: torch.Tensor, base_rows: int, added: list[dict], init: str,
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


def extend_embeddings(model: nn.Module, new_tokens: dict, init: str = "subtoken_mean", seed: int = 0) -> dict:
    """Resize ``model`` to ``new_tokens['vocab']`` padded to 64 and initialise the new rows. Returns a report."""
    if init not in INITS:
        raise ConfigError(f"train.embed_init={init!r}: expected one of {INITS}")
    vocab = int(new_tokens["vocab"])
    base_vocab = int(new_tokens["base_vocab"])
    added = list(new_tokens.get("added", []))
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    if base_vocab > old_rows:
        raise DataError(f"new_tokens.json: base_vocab {base_vocab} > the base model's {old_rows} embedding rows")
    for tok in added:
        if not base_vocab <= int(tok["id"]) < vocab:
            raise DataError(f"new_tokens.json: added id {tok['id']} outside [base_vocab {base_vocab}, vocab {vocab})")
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
    fallback = _init_rows(emb.weight, old_in, base_vocab, added, init, torch.Generator().manual_seed(seed))
    if head is not None:
        _init_rows(head.weight, old_out, base_vocab, added, init, torch.Generator().manual_seed(seed + 1))
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
