"""Build the model for training without ever holding the whole fp32 model on one rank (torchtitan's recipe).

1. ``build_on_meta``: the HF model class is instantiated from the base's ``config.json`` with the extended
   vocabulary, its parameters on the meta device (no memory, no random init); buffers (RoPE ``inv_freq``) are real,
   on CPU, computed by the model's own ``__init__``.
2. The caller shards it (``distributed.shard``: ``fully_shard`` per decoder layer, then the root), so every
   parameter is a DTensor holding 1/world of the rows.
3. ``materialize``: ``to_empty`` allocates each rank's shard on the device, and the buffers are put back.
4. ``load_base``: every rank reads only its own slices of the base's safetensors through DCP's
   ``HuggingFaceStorageReader`` (``safe_open`` + ``get_slice``: no rank reads the whole model). The vocabulary
   matrices (input embeddings, untied lm_head) have more rows than the base's, so they are read whole (one
   matrix at a time) and returned.
5. ``init_vocab_rows``: the new rows are computed on the full matrices with the very function the single-process
   resize uses (``embeddings.init_rows``), and each rank keeps its rows: bit-identical to the old path
   (``from_pretrained`` + ``extend_embeddings``), which tests/test_train_sharded.py checks on 1 and 2 ranks.
6. ``calibrate``: ``embeddings.calibrate_new_logits``, unchanged, on the gathered vocabulary matrices.

Without torch.distributed (one process) the same steps run with plain tensors: one code path for 1 and N ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from cpt.errors import DataError
from cpt.training.checkpoint import quiet_single_process
from cpt.training.embeddings import check_new_tokens, init_rows, padded

log = logging.getLogger("cpt.train")


@contextlib.contextmanager
def params_on_meta():
    """Every parameter registered inside is moved to the meta device as it is created (accelerate's
    ``init_empty_weights(include_buffers=False)``, without the dependency): a 7B model costs no memory and no init
    time, and buffers stay real so RoPE tables come from the model's own code."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def vocab_rows(new_tokens: dict, base_rows: int) -> int:
    """Embedding rows after the extension: the extended vocab (or the base's rows if larger), padded to 64 (as
    ``resize_token_embeddings(n, pad_to_multiple_of=64)`` does in the single-process path)."""
    return padded(max(int(new_tokens["vocab"]), base_rows), 64)


def base_rows(base_dir: Path) -> int:
    """The base's embedding rows, from its safetensors header (no weights read)."""
    name, key = _find_key(base_dir, _embed_key(base_dir))
    from safetensors import safe_open

    with safe_open(str(name), framework="pt") as f:
        return int(f.get_slice(key).get_shape()[0])


def build_on_meta(base_dir: Path, rows: int, trust_remote_code: bool = False) -> nn.Module:
    """The base's model class with ``rows`` vocabulary rows, fp32, parameters on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    config.vocab_size = rows
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    return model


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate every (possibly sharded) parameter on ``device``, uninitialised; the buffers keep their values and
    shared parameters (a tied lm_head) stay shared (``to_empty`` gives each name its own tensor when the parameters
    are plain meta tensors)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    first: dict[int, str] = {}
    shared: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared[name] = first.setdefault(id(p), name)
    model.to_empty(device=device)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, owner in shared.items():
        if name != owner and params[name] is not params[owner]:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, params[owner])
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def _vocab_names(model: nn.Module) -> dict[str, str]:
    """state-dict names of the vocabulary matrices: {"embed": name, "head": name (untied only)}."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    names: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is emb:
            names.setdefault("embed", name)
        elif head is not None and p is head.weight:
            names.setdefault("head", name)
    return names


def _index(base_dir: Path) -> dict[str, str]:
    """tensor name -> safetensors file name, from the index or the single file."""
    base_dir = Path(base_dir)
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    single = base_dir / "model.safetensors"
    if not single.exists():
        raise DataError(f"{base_dir}: no model.safetensors or model.safetensors.index.json (run `cpt base`)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single.name for k in f.keys()}


def _embed_key(base_dir: Path) -> str:
    keys = _index(base_dir)
    found = [k for k in keys if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")]
    if not found:
        raise DataError(f"{base_dir}: no input-embedding tensor among {len(keys)} safetensors keys")
    return found[0]


def _find_key(base_dir: Path, key: str) -> tuple[Path, str]:
    files = _index(base_dir)
    if key not in files:
        raise DataError(f"{base_dir}: tensor {key!r} is not in the base's safetensors")
    return Path(base_dir) / files[key], key


def _read_full(base_dir: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    path, key = _find_key(base_dir, key)
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key).float()


def load_base(model: nn.Module, base_dir: Path) -> dict[str, torch.Tensor]:
    """Fill ``model`` (materialised, possibly sharded) with the base weights, each rank reading its own slices.
    Returns the base's full vocabulary matrices (fp32, CPU): {"embed": ..., "head": ... (untied only)}; their rows
    in ``model`` are set by ``init_vocab_rows``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    names = _vocab_names(model)
    vocab = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        vocab.add(id(model.get_output_embeddings().weight))
    skip = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in vocab}
    state = {k: v for k, v in model.state_dict().items() if k not in skip}
    have = _index(base_dir)
    missing = sorted(k for k in state if k not in have)
    if missing:
        raise DataError(f"{base_dir}: the base's safetensors lack {len(missing)} tensors the model needs, e.g. "
                        f"{missing[:3]} (a checkpoint of another architecture or naming?)")
    import torch.distributed as dist

    with quiet_single_process():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(base_dir)),
                 no_dist=not (dist.is_available() and dist.is_initialized()))
    return {role: _read_full(base_dir, name) for role, name in names.items()}


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter: an all-gather for a DTensor (collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def write_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set a (possibly sharded) parameter from its whole value, present on every rank: each rank keeps its own
    slice (no communication)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None)
    param.copy_(value)


def init_vocab_rows(model: nn.Module, base: dict[str, torch.Tensor], new_tokens: dict, init: str, seed: int) -> dict:
    """Set the vocabulary matrices of ``model``: the base rows from ``base``, the new and padding rows exactly as
    ``embeddings.extend_embeddings`` sets them (same function, same seeds). Returns the same report."""
    emb = model.get_input_embeddings().weight
    old_rows = base["embed"].shape[0]
    added = check_new_tokens(new_tokens, old_rows, init)
    base_vocab = int(new_tokens["base_vocab"])
    report_fallback = 0
    for role, seed_offset in (("embed", 0), ("head", 1)):
        if role not in base:
            continue
        param = emb if role == "embed" else model.get_output_embeddings().weight
        value = torch.empty(param.shape, dtype=torch.float32)
        value[:old_rows] = base[role]
        fallback = init_rows(value, base[role], base_vocab, added, init,
                             torch.Generator().manual_seed(seed + seed_offset))
        if role == "embed":
            report_fallback = fallback
        write_full(param, value)
    if report_fallback:
        log.warning("%d new tokens had no usable base_ids; they got the all-rows mean", report_fallback)
    return {"vocab": int(new_tokens["vocab"]), "base_vocab": base_vocab, "rows_before": old_rows,
            "rows_after": int(emb.shape[0]), "added": len(added), "init": init, "init_fallback": report_fallback,
            "tied": "head" not in base and model.get_output_embeddings() is not None, "old_rows_restored": False}


def calibrate(core: nn.Module, hf_model: nn.Module, blocks: torch.Tensor, base_vocab: int, target_mass: float) -> dict:
    """``embeddings.calibrate_new_logits`` on the sharded model: it runs, unchanged, on a view holding the gathered
    vocabulary matrices, with hidden states from ``core.hidden`` (through the FSDP root's hooks, so every layer
    gathers its weights); the moved rows are then written back to each rank's shard."""
    from types import SimpleNamespace

    from cpt.training.embeddings import calibrate_new_logits

    emb = hf_model.get_input_embeddings().weight
    head = hf_model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    emb_full = full(emb.detach()).clone()
    head_full = emb_full if tied or head is None else full(head.weight.detach()).clone()
    view = SimpleNamespace(
        config=hf_model.config,
        get_input_embeddings=lambda: SimpleNamespace(weight=emb_full),
        get_output_embeddings=lambda: None if head is None else SimpleNamespace(weight=head_full),
        base_model=lambda input_ids, use_cache=False: (core.hidden(input_ids),),
    )
    if hasattr(core, "reshard"):  # an FSDP2 module: run ``hidden`` through its pre/post-forward hooks
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(core, "hidden")
    report = calibrate_new_logits(view, blocks, base_vocab, target_mass)
    write_full(emb, emb_full)
    if head is not None and not tied:
        write_full(head.weight, head_full)
    return report
