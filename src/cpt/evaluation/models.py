"""Load a model folder with ITS OWN tokenizer, encoded by cpt's one text -> ids rule.

Base and cpt models use different tokenizers (the cpt tokenizer is extended), so every score is computed with the
model's own tokenizer on the same text, and compared per UTF-8 byte. Texts are encoded exactly as the shards stage
encodes training documents (``cpt.tok.codec``: special-token strings such as WikiText's literal ``<unk>`` stay
text, nothing added) and conditioned on ``prefix_id``: the BOS the shards put before every document, else the EOS
that precedes a document in the packed stream. No EOS is scored (it has no bytes behind it). The HF tokenizer is
kept for decoding generations only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cpt.device import autocast_dtype, pick_device
from cpt.errors import ConfigError, DataError
from cpt.tok.codec import TextCodec

log = logging.getLogger("cpt.stages.eval")


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerBase (decoding generations)
    codec: TextCodec  # text -> ids, as the shards encode it
    prefix_id: int
    device: torch.device
    amp_dtype: torch.dtype | None
    max_positions: int | None

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text as the shards encode it, nothing added (the caller prefixes ``prefix_id``)."""
        return self.codec.encode(texts)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


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
    codec = TextCodec.from_folder(path)
    lm = LoadedModel(name, path, model, tokenizer, codec, codec.prefix_id, dev, amp, max_pos)
    log.info("%s: %s (%.2fM params, vocab %d) on %s", name, path, lm.parameters / 1e6, len(tokenizer), dev)
    return lm


