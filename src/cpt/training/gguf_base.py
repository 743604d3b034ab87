"""A GGUF file (llama.cpp's format; how many small models are packaged) as the base: dequantized by transformers to
float32 and written to data/base as a plain HF folder (safetensors, tokenizer.json, the chat template, a config
without ``quantization_config``), so every later stage reads it like any other HF base.

Why the extra step after loading: transformers marks a model loaded with ``gguf_file=`` as quantized (a leftover
GGUF quantizer). ``save_pretrained`` then raises and the trainer counts the model as untrainable;
``model.hf_quantizer.remove_quantization_config(model)`` right after loading removes both, and the saved folder
reloads with plain ``from_pretrained`` with bit-identical logits (tests/test_gguf_base.py).

Needs the ``gguf`` and ``accelerate`` packages (the ``gguf`` extra of pyproject.toml).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cpt.errors import ConfigError
from cpt.io import write_json
from cpt.layout import Layout

log = logging.getLogger("cpt.stages.base")


def is_gguf(name: str) -> bool:
    """``base.model`` names a GGUF file (by its suffix: a GGUF is one file, an HF base a folder or hub id)."""
    return str(name).lower().endswith(".gguf")


def load_gguf_model(path: Path):
    """(model, tokenizer) from one GGUF file, dequantized to float32 and with the GGUF quantizer removed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for pkg in ("gguf", "accelerate"):
        try:
            __import__(pkg)
        except ImportError as exc:
            raise ConfigError(
                f"params base.model: {path} is a GGUF file; loading it needs the {pkg!r} package "
                "(pip install 'cpt[gguf]')"
            ) from exc
    import torch

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"params base.model: cannot load {path} as a GGUF causal LM: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def load_gguf_base(cfg: dict[str, Any], layout: Layout, tmp: Path) -> dict[str, Any]:
    """Write ``tmp`` as the HF folder of the GGUF named by ``base.model``; returns the stage's metrics."""
    path = layout.resolve(str(cfg["model"]))
    if not path.is_file():
        raise ConfigError(f"params base.model: GGUF file {path} does not exist (fetch it first, e.g. `make smollm2`)")
    model, tokenizer = load_gguf_model(path)
    if getattr(model.config, "quantization_config", None) is not None:  # pragma: no cover - transformers changed
        del model.config.quantization_config
    model.config._name_or_path = path.stem
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "source": str(cfg["model"]),
        "resolved": str(path),
        "format": "gguf",
        "gguf_bytes": path.stat().st_size,
        "revision": None,
        "model_type": model.config.model_type,
        "architectures": list(model.config.architectures or []),
        "params": n_params,
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
        "tokenizer_size": len(tokenizer),
        "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "tokenizer_model": False,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }
    write_json(tmp / "cpt_base.json", info)
    log.info("loaded GGUF %s (%s, %.1fM params, vocab %d, dequantized to float32)", path.name, info["model_type"],
             n_params / 1e6, info["vocab_size"])
    return {k: v for k, v in info.items() if k not in ("resolved", "architectures")}
