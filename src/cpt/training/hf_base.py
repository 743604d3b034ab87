"""Loading a Hugging Face base model into data/base: safetensors only, ``trust_remote_code`` off unless asked, the
SentencePiece ``tokenizer.model`` fetched beside the fast tokenizer when the repo has one."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from cpt.errors import ConfigError
from cpt.io import write_json
from cpt.layout import Layout

log = logging.getLogger("cpt.stages.base")


def resolve_source(name: str, layout: Layout) -> str:
    """A local folder (absolute or relative to the project root) or a hub id, as given."""
    path = layout.resolve(name)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"params base.model: {path} is a file; expected an HF model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"params base.model: {path} does not exist (and {name!r} is not a hub id)")
    return name


def fetch_tokenizer_model(source: str, revision: str | None, dest: Path) -> bool:
    """Copy the source's SentencePiece ``tokenizer.model`` into ``dest`` when it has one."""
    local = Path(source) / "tokenizer.model"
    if Path(source).is_dir():
        if local.exists():
            shutil.copyfile(local, dest / "tokenizer.model")
            return True
        return False
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(source, "tokenizer.model", revision=revision)
    except Exception:  # noqa: BLE001 - no such file in the repo (byte-level BPE models) or offline
        return False
    shutil.copyfile(path, dest / "tokenizer.model")
    return True


def load_hf_base(cfg: dict[str, Any], layout: Layout, tmp: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(str(cfg["model"]), layout)
    kwargs: dict[str, Any] = {"trust_remote_code": bool(cfg["trust_remote_code"])}
    if cfg.get("revision"):
        kwargs["revision"] = str(cfg["revision"])
    try:
        model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, dtype="auto", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"params base.model: cannot load {source!r} as a causal LM with safetensors weights "
            f"(trust_remote_code={kwargs['trust_remote_code']}): {str(exc).splitlines()[0]}"
        ) from exc
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    has_spm = fetch_tokenizer_model(source, kwargs.get("revision"), tmp)
    n_params = sum(p.numel() for p in model.parameters())
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    info = {
        "source": str(cfg["model"]),
        "resolved": source,
        "revision": kwargs.get("revision"),
        "model_type": model.config.model_type,
        "architectures": list(model.config.architectures or []),
        "params": n_params,
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
        "tokenizer_size": len(tokenizer),
        "tied_embeddings": tied,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "tokenizer_model": has_spm,
    }
    write_json(tmp / "cpt_base.json", info)
    log.info("loaded %s (%s, %.1fM params, vocab %d)", source, info["model_type"], n_params / 1e6,
             info["vocab_size"])
    return {k: v for k, v in info.items() if k not in ("resolved", "architectures")}
