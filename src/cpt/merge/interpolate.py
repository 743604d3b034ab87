"""Weight interpolation between the extended base and the cpt model: theta(a) = (1 - a) theta_base + a theta_cpt.

Both models come from one base: train resized the base's embedding (and untied head) to the extended vocabulary and
trained every weight. So every matrix has the same shape on both sides except the vocabulary matrices, whose first
``shared`` rows are the base tokenizer's tokens (checked here, token by token: the cpt tokenizer must keep every
base token at its id) and whose further rows are tokens the base never had.

**The new rows are not scaled: they take the cpt's values at every a.** The "extended base" is the base with its
vocabulary matrices resized to the cpt's rows, the new rows holding the cpt's values, so the interpolation moves
only what the base has a value for. Why not scale them towards train's initialisation (the subtoken mean)? That
point is no model anyone measured: the base has no row for these tokens, and train's starting rows were a guess
meant to be trained away. The merged model reads text with the cpt tokenizer, which spells the new languages with
these tokens; scaling their rows would change what a token means at each a, on top of how far the shared update
goes, so a would no longer measure one thing. Old-language text spells no new token (the tokenizer stage's guard
keeps old text's tokenization unchanged), so what the old language reads moves with a alone; the probability the
new head rows take on old text is part of each point's measured forgetting.

Arithmetic: ``torch.lerp(base, cpt, a)``, which equals (1 - a) base + a cpt up to rounding and is exact at the ends
(a = 0 gives the base's tensor, a = 1 the cpt's, bit for bit). Weights stay in fp32; the base's and cpt's tensors
are held once, and each grid point is written into one model in place (3 models' memory, not 2 + one per point).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpt.errors import DataError
from cpt.io import replace_dir, write_json

log = logging.getLogger("cpt.stages.merge")

RULE = "new_rows: cpt (unscaled); shared weights: (1 - a) base + a cpt"
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")


def shared_rows(base_dir: Path, cpt_dir: Path) -> int:
    """The number of leading vocabulary rows base and cpt share: the base tokenizer's size, after checking that
    the cpt tokenizer keeps every base token at the same id (else rows would be averaged across tokens)."""
    from transformers import AutoTokenizer

    base_vocab = AutoTokenizer.from_pretrained(base_dir).get_vocab()
    cpt_vocab = AutoTokenizer.from_pretrained(cpt_dir).get_vocab()
    moved = [(tok, i, cpt_vocab.get(tok)) for tok, i in base_vocab.items() if cpt_vocab.get(tok) != i]
    if moved:
        tok, i, j = sorted(moved, key=lambda m: m[1])[0]
        raise DataError(f"{cpt_dir}: the cpt tokenizer does not extend the base's ({base_dir}): {len(moved)} base "
                        f"tokens moved or missing, first {tok!r} (id {i} in the base, {j} in the cpt); merging "
                        "needs the base's tokens at their ids")
    return max(base_vocab.values()) + 1 if base_vocab else 0


def vocab_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters with a vocabulary dimension: the input embedding and an untied output head."""
    wanted = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        wanted.add(id(head.weight))
    return {name for name, p in model.named_parameters() if id(p) in wanted}


@dataclass
class Pair:
    """The two endpoints' tensors (fp32, on the scoring device), by parameter name; ``vocab``: the parameters whose
    rows from ``shared`` on take the cpt's values at every a."""

    base: dict[str, torch.Tensor]
    cpt: dict[str, torch.Tensor]
    shared: int
    vocab: set[str]


def pair(base_model: torch.nn.Module, cpt_model: torch.nn.Module, shared: int) -> Pair:
    """Check that the two models line up parameter by parameter and keep a copy of each side's tensors."""
    base = dict(base_model.named_parameters())
    cpt = dict(cpt_model.named_parameters())
    if set(base) != set(cpt):
        diff = sorted(set(base) ^ set(cpt))
        raise DataError(f"base and cpt models have different parameters (tied head on one side only?): {diff[:5]}")
    vocab = vocab_names(cpt_model)
    for name, c in cpt.items():
        b = base[name]
        if name in vocab:
            if b.shape[1:] != c.shape[1:] or min(b.shape[0], c.shape[0]) < shared:
                raise DataError(f"{name}: base {tuple(b.shape)} and cpt {tuple(c.shape)} cannot share {shared} rows")
        elif b.shape != c.shape:
            raise DataError(f"{name}: base {tuple(b.shape)} vs cpt {tuple(c.shape)}; only vocabulary rows may differ")
    dev = next(cpt_model.parameters()).device
    with torch.no_grad():
        return Pair({n: base[n].detach().float().to(dev).clone() for n in cpt},
                    {n: c.detach().float().clone() for n, c in cpt.items()}, shared, vocab)


@torch.no_grad()
def weights(p: Pair, name: str, alpha: float) -> torch.Tensor:
    """theta(a) of one parameter (a new tensor)."""
    b, c = p.base[name], p.cpt[name]
    if name not in p.vocab:
        return torch.lerp(b, c, float(alpha))
    out = c.clone()
    out[: p.shared] = torch.lerp(b[: p.shared], c[: p.shared], float(alpha))
    return out


@torch.no_grad()
def apply(model: torch.nn.Module, p: Pair, alpha: float) -> None:
    """Write theta(a) into ``model`` (the loaded cpt model) in place."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"merge: a must be in [0, 1], got {alpha}")
    for name, param in model.named_parameters():
        param.copy_(weights(p, name, alpha))


def save(model: torch.nn.Module, cpt_dir: Path, out: Path, info: dict[str, Any]) -> None:
    """The merged model as an HF folder: ``save_pretrained`` (config + safetensors) plus the cpt folder's tokenizer
    and other non-weight files, and ``merge.json`` (a, the two endpoints, the new-rows rule). Swapped in whole."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in sorted(Path(cpt_dir).iterdir()):
        if f.is_file() and not (tmp / f.name).exists() and not f.name.endswith(WEIGHTS) \
                and not f.name.endswith(".index.json"):
            shutil.copy2(f, tmp / f.name)
    write_json(tmp / "merge.json", info, sort_keys=True)
    replace_dir(tmp, out)


def placeholder(out: Path, info: dict[str, Any]) -> None:
    """No a passed: the output folder holds only ``merge.json`` saying why (DVC needs the output to exist, and a
    stale merged model from an earlier run must not stay behind looking current)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "merge.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    replace_dir(tmp, out)
