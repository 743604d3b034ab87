"""HF export from the sharded state: safetensors shards + index, one tensor gathered at a time, never the optimizer.

At the end of ``cpt train`` the live model is exported (every rank takes part in gathering one tensor at a time;
rank 0 writes); ``cpt export`` does the same from a DCP checkpoint on disk in one process, reading only the model's
tensors (``export_checkpoint``). Either way the peak memory is one shard file (``max_shard_gb``) plus one tensor, so
a 7B model exports on a host that could never hold its fp32 weights and Adam moments, and the files are what
``save_pretrained`` writes: ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` +
``model.safetensors.index.json``), ``config.json`` (the extended, padded vocab; the base's dtype), the generation
config and every file of data/tokenizer. The folder is written beside ``out`` and swapped in atomically.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from cpt.errors import DataError
from cpt.io import read_json, replace_dir
from cpt.training.distributed import DistInfo, reshard

PREFIX = "model."  # CausalLMLoss holds the HF model as ``.model``


def duplicate_names(hf_model: nn.Module) -> set[str]:
    """Names of parameters that are another name's tensor (a tied lm_head): written once, under the first name,
    as save_pretrained does (a gathered state dict holds both)."""
    first: dict[int, str] = {}
    for name, p in hf_model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    return {name for name, p in hf_model.named_parameters(remove_duplicate=False) if first[id(p)] != name}


def plan_files(shapes: dict[str, tuple[torch.Size, int]], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most ``max_bytes`` (a bigger tensor gets a file of its own), in order.
    ``shapes``: name -> (shape, bytes per element in the saved dtype)."""
    files: list[list[str]] = [[]]
    size = 0
    for name, (shape, itemsize) in shapes.items():
        nbytes = int(torch.Size(shape).numel()) * itemsize
        if files[-1] and size + nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    return files


def file_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_folder(tmp: Path, groups: list[list[str]], tensors: Iterator[tuple[str, torch.Tensor | None]],
                 hf_model: nn.Module, save_dtype: torch.dtype, tokenizer_dir: Path, main: bool) -> None:
    """Consume ``tensors`` (name, whole tensor; the names in ``groups`` order) and, on ``main``, write the files."""
    from safetensors.torch import save_file

    names = file_names(len(groups))
    weight_map: dict[str, str] = {}
    total = 0
    for fname, group in zip(names, groups):
        shard: dict[str, torch.Tensor] = {}
        for expected in group:
            name, t = next(tensors)
            assert name == expected, (name, expected)
            if main and t is not None:
                shard[name] = t.detach().to("cpu", save_dtype).contiguous()
        if main:
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        del shard
    if not main:
        return
    if len(names) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    hf_model.config.dtype = save_dtype
    hf_model.config.save_pretrained(tmp)
    generation = getattr(hf_model, "generation_config", None)
    if generation is not None and hf_model.can_generate():
        generation.save_pretrained(tmp)
    for f in sorted(Path(tokenizer_dir).iterdir()):
        if f.is_file():
            shutil.copy2(f, tmp / f.name)


def export_model(core: nn.Module, hf_model: nn.Module, tokenizer_dir: Path, out: Path, save_dtype: torch.dtype,
                 info: DistInfo | None = None, max_shard_gb: float = 5.0) -> None:
    """Collective: write ``out`` from the live (possibly sharded) model ``core`` (a CausalLMLoss over
    ``hf_model``); each DTensor is gathered alone, the optimizer never; rank 0 (``info.main``) writes."""
    main = info is None or info.main
    reshard(core)
    skip = duplicate_names(hf_model)
    params = {name[len(PREFIX):]: t for name, t in core.state_dict().items()
              if name.startswith(PREFIX) and name[len(PREFIX):] not in skip}
    itemsize = torch.empty((), dtype=save_dtype).element_size()
    groups = plan_files({k: (t.shape, itemsize) for k, t in params.items()}, int(max_shard_gb * 2**30))
    order = [name for group in groups for name in group]

    def gathered():
        for name in order:
            t = params[name]
            yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t)

    out = Path(out)
    tmp = out.parent / f".tmp-{out.name}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    write_folder(tmp, groups, gathered(), hf_model, save_dtype, tokenizer_dir, main)
    if main:
        replace_dir(tmp, out)


def export_checkpoint(checkpoint: Path, base_dir: Path, tokenizer_dir: Path, out: Path,
                      save_dtype: torch.dtype | None = None, max_shard_gb: float = 5.0,
                      trust_remote_code: bool = False) -> dict:
    """One process: write ``out`` from the DCP checkpoint folder ``checkpoint`` (any world size), reading one
    file's worth of model tensors at a time (in the saved dtype directly) and none of the optimizer's."""
    import torch.distributed.checkpoint as dcp

    from cpt.training.checkpoint import quiet_single_process
    from cpt.training.sharded import build_on_meta

    checkpoint = Path(checkpoint)
    meta = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    saved = {k[len("model." + PREFIX):]: v for k, v in meta.items() if k.startswith("model." + PREFIX)}
    embed = [k for k in saved if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")]
    if not saved or not embed:
        raise DataError(f"{checkpoint}: no model tensors in this DCP checkpoint (not a cpt train checkpoint?)")
    if any(".lora_A." in k for k in saved):
        raise DataError(f"{checkpoint}: a train.method=lora/qlora checkpoint (LoRA tensors): `cpt export` writes full "
                        "checkpoints only; the run's end exports the merged model and adapter/ (docs/train.md)")
    if save_dtype is None:
        save_dtype = config_dtype(read_json(Path(base_dir) / "config.json"))
    hf_model = build_on_meta(base_dir, int(saved[embed[0]].size[0]), trust_remote_code)
    skip = duplicate_names(hf_model)
    names = [n for n, _ in hf_model.state_dict().items() if n not in skip]
    missing = [n for n in names if n not in saved]
    if missing:
        raise DataError(f"{checkpoint}: the checkpoint lacks {missing[:3]} ({len(missing)} model tensors): made "
                        f"from another base than {base_dir}?")
    itemsize = torch.empty((), dtype=save_dtype).element_size()
    groups = plan_files({n: (saved[n].size, itemsize) for n in names}, int(max_shard_gb * 2**30))

    def loaded():
        for group in groups:
            buf = {PREFIX + n: torch.empty(saved[n].size, dtype=save_dtype) for n in group}
            with quiet_single_process():
                dcp.load({"model": buf}, checkpoint_id=str(checkpoint), no_dist=True)
            for n in group:
                yield n, buf.pop(PREFIX + n)

    out = Path(out)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_folder(tmp, groups, loaded(), hf_model, save_dtype, tokenizer_dir, True)
    replace_dir(tmp, out)
    return {"checkpoint": str(checkpoint), "out": str(out), "tensors": len(names), "files": len(groups),
            "dtype": str(save_dtype).replace("torch.", "")}


def config_dtype(base_config: dict) -> torch.dtype:
    name = base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)
