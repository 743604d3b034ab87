"""Data parallelism through torchrun: DDP, or FSDP2 (``fully_shard``) for models whose weights, gradients and Adam
state do not fit one GPU.

``torchrun --nproc-per-node 8 -m cpt.cli train`` sets RANK / WORLD_SIZE / LOCAL_RANK; ``setup`` reads them and
starts NCCL on CUDA or gloo on CPU (the CPU test runs 2 gloo processes). A plain ``cpt train`` is world size 1 and
never touches torch.distributed. Every rank reads its own slice of the global batch (cpt.training.data) and the
gradients are averaged, so the loss of a step does not depend on the number of ranks.

FSDP2 shards each decoder layer (the model's ``_no_split_modules`` classes, which HF declares for exactly this) and
then the root, which holds embeddings, final norm and lm_head; so a tied head stays one parameter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cpt.errors import ConfigError

PARALLEL = ("ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we started the process group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_request: str = "auto") -> tuple[DistInfo, torch.device]:
    """Read the torchrun environment and start the process group if world size > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_request in ("auto", "cuda")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu" if device_request == "auto" else device_request)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = DistInfo(rank, world, local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
        info.owns_group = True
    return info, device


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def block_classes(model: nn.Module) -> tuple[type, ...]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(f"{type(model).__name__} declares no _no_split_modules: cannot find its blocks for FSDP")
    return tuple(classes)


def wrap(module: nn.Module, hf_model: nn.Module, parallel: str, info: DistInfo, device: torch.device,
         param_dtype: torch.dtype | None) -> nn.Module:
    """The module to call in the training step. ``module`` wraps ``hf_model`` (cpt.training.loss.CausalLMLoss).
    FSDP mutates ``module`` in place (so its state dict stays the model's); DDP returns a wrapper."""
    if parallel not in PARALLEL:
        raise ConfigError(f"train.parallel={parallel!r}: expected one of {PARALLEL}")
    if not info.enabled:
        return module
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for block in [m for m in hf_model.modules() if isinstance(m, block_classes(hf_model))]:
        fully_shard(block, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def no_sync(model: nn.Module, last_micro: bool):
    """Skip DDP's gradient all-reduce on every micro-batch but the last (FSDP2 reduces every time, which is right:
    it frees the unsharded grads)."""
    import contextlib

    if isinstance(model, nn.parallel.DistributedDataParallel) and not last_micro:
        return model.no_sync()
    return contextlib.nullcontext()
