"""The trained model as an HF folder (safetensors in the base's dtype + the extended tokenizer), written atomically;
under FSDP the full state dict is gathered collectively, then written by rank 0."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from cpt.io import replace_dir
from cpt.training import distributed


def export_model(core: torch.nn.Module, hf_model: torch.nn.Module, tokenizer_dir: Path, out: Path,
                 save_dtype: torch.dtype, info: distributed.DistInfo) -> None:
    """Write ``out`` as an HF folder (safetensors + the extended tokenizer), atomically (temp folder + rename)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=info.enabled)
    full = get_model_state_dict(core, options=opts)  # collective under FSDP
    if not info.main:
        return
    prefix = "model."
    state = {k[len(prefix):]: v.to(save_dtype) for k, v in full.items() if k.startswith(prefix)}
    # A tied head is one tensor under two names; gathered state dicts can hold two copies, which save_pretrained
    # would then write twice (and as untied). Keep each parameter's first name only.
    first: dict[int, str] = {}
    for name, p in hf_model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    dupes = {name for name, p in hf_model.named_parameters(remove_duplicate=False) if first[id(p)] != name}
    state = {k: v for k, v in state.items() if k not in dupes}
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_model.config.dtype = save_dtype
    hf_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    for f in sorted(tokenizer_dir.iterdir()):
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, out)


def config_dtype(base_config: dict) -> torch.dtype:
    name = base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)
