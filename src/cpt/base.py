"""Stage `base`: the pretrained model that continual pretraining starts from, as an HF folder in data/base.

``base.model`` is either

- a Hugging Face model folder or hub id of any ``AutoModelForCausalLM`` (Llama, Mistral, Qwen, GPT-2, ...): loaded
  with safetensors only (``use_safetensors=True``: no pickle from the internet), remote code only when
  ``base.trust_remote_code: true``, and saved with its tokenizer (plus the SentencePiece ``tokenizer.model`` when the
  source has one: the tokenizer stage extends that file, and transformers 5 no longer writes it); or
- ``builtin:tiny``, the offline demo: a few-million-parameter Llama that this stage pretrains from scratch on the
  ``role: train, domain: old`` cleaned text with its own SentencePiece tokenizer (``cpt.tiny``). Old-domain documents
  are held out by the same hash split as the shards stage (``cpt.packing.val_ids``); with
  ``base.tiny.val_fraction >= shards.val_fraction`` (and one seed) no document that eval scores as held out was
  seen in pretraining.

Either way data/base also gets ``cpt_base.json`` (``{"source": ..., ...}``) and is replaced atomically.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from cpt import tiny
from cpt.errors import ConfigError, DataError
from cpt.io import replace_dir, write_json
from cpt.layout import Layout
from cpt.packing import val_ids
from cpt.params import stage_config, with_defaults
from cpt.records import iter_docs

log = logging.getLogger("cpt.base")

BUILTIN_TINY = "builtin:tiny"
DEFAULTS: dict[str, Any] = {
    "model": BUILTIN_TINY,
    "revision": None,  # hub revision (branch, tag or commit) for a hub id
    "trust_remote_code": False,
    "tiny": {},  # overrides of cpt.tiny.DEFAULTS
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


def _build_tiny(cfg: dict[str, Any], seed: int, layout: Layout, tmp: Path) -> dict[str, Any]:
    tcfg = cfg["tiny"]
    try:
        docs = list(iter_docs(layout.clean, role="train", domain="old"))
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    if not docs:
        raise DataError(f"{layout.clean}: no role: train, domain: old documents to pretrain builtin:tiny on")
    held = val_ids([str(d["id"]) for d in docs], seed, float(tcfg["val_fraction"]))
    train = [d["text"] for d in docs if str(d["id"]) not in held]
    heldout = [d["text"] for d in docs if str(d["id"]) in held]
    log.info("builtin:tiny: %d English documents for pretraining, %d held out", len(train), len(heldout))
    try:
        metrics = tiny.build(train, heldout, tmp, tcfg, seed)
    except (ValueError, FloatingPointError) as exc:
        raise DataError(f"{layout.clean}: builtin:tiny pretraining failed: {exc}") from exc
    info = {
        "source": BUILTIN_TINY,
        "seed": seed,
        "tiny": tcfg,
        "train_docs": len(train),
        "heldout_docs": sorted(held),
        # timings stay in metrics/base.json: inside the artifact they changed its DVC hash on every identical rerun
        "metrics": {k: v for k, v in metrics.items() if not k.endswith(("_seconds", "_per_s"))},
    }
    write_json(tmp / "cpt_base.json", info)
    if "heldout_loss" in metrics:
        log.info("held-out loss %.4f (%.4f bits/byte) vs unigram %.4f", metrics["heldout_loss"],
                 metrics["heldout_bpb"], metrics["unigram_loss"])
    return {"source": BUILTIN_TINY, "train_docs": len(train), "heldout_docs": len(heldout), **metrics}


def _resolve_source(name: str, layout: Layout) -> str:
    """A local folder (absolute or relative to the project root) or a hub id, as given."""
    path = layout.resolve(name)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"params base.model: {path} is a file; expected an HF model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"params base.model: {path} does not exist (and {name!r} is not a hub id)")
    return name


def _fetch_tokenizer_model(source: str, revision: str | None, dest: Path) -> bool:
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


def _load_hf(cfg: dict[str, Any], layout: Layout, tmp: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _resolve_source(str(cfg["model"]), layout)
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
    has_spm = _fetch_tokenizer_model(source, kwargs.get("revision"), tmp)
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


def run(params: dict[str, Any], layout: Layout) -> dict[str, Any]:
    cfg = config(params)
    seed = int(params.get("seed", 0))
    out = layout.base
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if str(cfg["model"]) == BUILTIN_TINY:
            metrics = _build_tiny(cfg, seed, layout, tmp)
        elif str(cfg["model"]).startswith("builtin:"):
            raise ConfigError(f"params base.model: unknown builtin {cfg['model']!r}; the builtin is {BUILTIN_TINY}")
        else:
            metrics = _load_hf(cfg, layout, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return metrics
