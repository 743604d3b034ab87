"""Load a model folder with ITS OWN tokenizer, and the one rule for how a text is conditioned.

Base and cpt models use different tokenizers (the cpt tokenizer is extended), so every score is computed with the
model's own tokenizer on the same text, and compared per UTF-8 byte. Each text is encoded WITHOUT the tokenizer's
automatic special tokens and prefixed by exactly one "prefix token": BOS when the tokenizer has one, else EOS
(lm-evaluation-harness's rule for GPT-2-style tokenizers). So the first real token is conditioned on a start symbol,
the same way for every model, and no EOS is scored (it has no bytes behind it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cpt.device import autocast_dtype, pick_device
from cpt.errors import ConfigError, DataError

log = logging.getLogger("cpt.stages.eval")


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    prefix_id: int
    device: torch.device
    amp_dtype: torch.dtype | None
    max_positions: int | None

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (the caller prefixes ``prefix_id``)."""
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def prefix_token_id(tokenizer, where: Path) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    raise ConfigError(f"{where}: tokenizer has neither a BOS nor an EOS token; cannot condition the first token")


def load_model(name: str, path: Path, *, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from an HF folder, in eval mode on the chosen device.

    Weights stay fp32; on CUDA the forward runs under bf16 autocast (cpt.device) and log-softmax is taken in fp32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        stage = "train" if name == "cpt" else "base"
        raise DataError(f"{path}: no config.json; the {name} model folder is missing (run `cpt {stage}` first)")
    dev = pick_device(device)
    try:
        amp = autocast_dtype(dev, dtype)
    except ValueError as exc:
        raise ConfigError(f"eval.dtype: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = 1 << 62  # we window long documents ourselves; silence the length warning
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.to(dev).eval()
    emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > emb:
        raise DataError(f"{path}: tokenizer has {len(tokenizer)} tokens but the model's embedding has {emb} rows")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    lm = LoadedModel(name, path, model, tokenizer, prefix_token_id(tokenizer, path), dev, amp, max_pos)
    log.info("%s: %s (%.2fM params, vocab %d) on %s", name, path, lm.parameters / 1e6, len(tokenizer), dev)
    return lm


