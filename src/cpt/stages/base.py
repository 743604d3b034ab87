"""Stage `base`: the pretrained model that continual pretraining starts from, as an HF folder in data/base.

``base.model`` is either

- a Hugging Face model folder or hub id of any ``AutoModelForCausalLM`` (Llama, Mistral, Qwen, GPT-2, ...): loaded
  with safetensors only (``use_safetensors=True``: no pickle from the internet), remote code only when
  ``base.trust_remote_code: true``, and saved with its tokenizer (plus the SentencePiece ``tokenizer.model`` when the
  source has one: the tokenizer stage extends that file, and transformers 5 no longer writes it); or
- a GGUF file (``*.gguf``, e.g. SmolLM2 from ``make smollm2``): dequantized to float32 and saved as a plain HF
  folder (``cpt.training.gguf_base``); or
- ``builtin:tiny``, the offline demo: a few-million-parameter Llama that this stage pretrains from scratch on the
  ``role: train, domain: old`` cleaned text with its own SentencePiece tokenizer (``cpt.training.tiny``). Old-domain documents
  are held out by the same hash split as the shards stage (``cpt.data.packing.val_ids``); with
  ``base.tiny.val_fraction >= shards.val_fraction`` (and one seed) no document that eval scores as held out was
  seen in pretraining.

Either way data/base also gets ``cpt_base.json`` (``{"source": ..., ...}``) and is replaced atomically.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from cpt.errors import ConfigError
from cpt.io import replace_dir
from cpt.layout import Layout
from cpt.params import stage_config, with_defaults
from cpt.training import tiny
from cpt.training.gguf_base import is_gguf, load_gguf_base
from cpt.training.hf_base import load_hf_base
from cpt.training.tiny import BUILTIN_TINY, build_tiny_base

log = logging.getLogger("cpt.stages.base")

DEFAULTS: dict[str, Any] = {
    "model": BUILTIN_TINY,
    "revision": None,  # hub revision (branch, tag or commit) for a hub id
    "trust_remote_code": False,
    "tiny": {},  # overrides of cpt.training.tiny.DEFAULTS
}


def config(params: dict[str, Any]) -> dict[str, Any]:
    cfg = stage_config(params, "base", DEFAULTS)
    tiny_cfg = with_defaults("base.tiny", cfg["tiny"], tiny.DEFAULTS)
    for key in ("vocab_size", "hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "block_size",
                "steps", "batch_size"):
        if not isinstance(tiny_cfg[key], int) or tiny_cfg[key] < 1:
            raise ConfigError(f"params base.tiny.{key}: expected a positive integer, got {tiny_cfg[key]!r}")
    if tiny_cfg["hidden_size"] % tiny_cfg["heads"] or tiny_cfg["heads"] % tiny_cfg["kv_heads"]:
        raise ConfigError("params base.tiny: hidden_size must divide by heads, and heads by kv_heads")
    if not 0 <= float(tiny_cfg["val_fraction"]) < 0.5:
        raise ConfigError(f"params base.tiny.val_fraction: expected 0 <= value < 0.5, got {tiny_cfg['val_fraction']}")
    cfg["tiny"] = tiny_cfg
    return cfg


def run(params: dict[str, Any], layout: Layout) -> dict[str, Any]:
    cfg = config(params)
    seed = int(params.get("seed", 0))
    out = layout.base
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if str(cfg["model"]) == BUILTIN_TINY:
            metrics = build_tiny_base(cfg, seed, layout, tmp)
        elif str(cfg["model"]).startswith("builtin:"):
            raise ConfigError(f"params base.model: unknown builtin {cfg['model']!r}; the builtin is {BUILTIN_TINY}")
        elif is_gguf(str(cfg["model"])):
            metrics = load_gguf_base(cfg, layout, tmp)
        else:
            metrics = load_hf_base(cfg, layout, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return metrics
