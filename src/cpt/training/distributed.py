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

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

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


@contextlib.contextmanager
def session(device_request: str = "auto", threads: int | None = None) -> Iterator[tuple[DistInfo, torch.device]]:
    """One training process (train, sft): torchrun's process group if any, the device, deterministic algorithms on
    CPU (bit-reproducible runs: exact resume is tested there) and the thread count; all restored on exit."""
    info, device = setup(device_request)
    deterministic_before, threads_before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield info, device
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.set_num_threads(threads_before)
        teardown(info)


def block_classes(model: nn.Module) -> tuple[type, ...]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(f"{type(model).__name__} declares no _no_split_modules: cannot find its blocks for FSDP")
    return tuple(classes)


def wrap(module: nn.Module, hf_model: nn.Module, parallel: str, info: DistInfo, device: torch.device,
         param_dtype: torch.dtype | None) -> nn.Module:
    """The module to call in the training step. ``module`` wraps ``hf_model`` (cpt.training.loss.CausalLMLoss).
    FSDP mutates ``module`` in place (so its state dict stays the model's; ``shard`` may have done it already, on
    the meta device); DDP returns a wrapper."""
    if parallel not in PARALLEL:
        raise ConfigError(f"train.parallel={parallel!r}: expected one of {PARALLEL}")
    if not info.enabled:
        return module
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if not is_sharded(module):
        shard(module, hf_model, param_dtype)
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


def shard(core: nn.Module, hf_model: nn.Module, param_dtype: torch.dtype | None,
          reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 as torchtitan applies it: ``fully_shard`` on every decoder layer, then on ``core`` (the root: embeddings,
    final norm, lm_head; a tied head stays one parameter). Mixed precision: parameters gathered in ``param_dtype``
    (bf16 on GPU) for compute, gradients reduced in fp32, master weights and Adam state fp32. Works on a meta-device
    model (cpt.training.sharded builds it so), so no rank ever holds the whole model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype
          else MixedPrecisionPolicy())
    for block in [m for m in hf_model.modules() if isinstance(m, block_classes(hf_model))]:
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(core, mp_policy=mp)
    return core


def reshard(module: nn.Module) -> None:
    """Put FSDP2's sharded parameters back on ``module`` after a forward without backward (eval, calibration).
    FSDP2 keeps the root's parameters gathered after forward, expecting a backward that reshards them; until then
    ``named_parameters`` returns the gathered tensors, which an optimizer built then, or the checkpoint's optimizer
    state dict, would not recognise."""
    if is_sharded(module):
        module.reshard()


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def batch_for_world(saved: dict | None, micro_batch: int, grad_accum: int, world_size: int) -> tuple[int, str | None]:
    """The grad_accum to use on ``world_size`` ranks when continuing a checkpoint whose state says it ran with
    ``saved`` = {"world_size", "micro_batch", "grad_accum"}, and a note for the log (None: nothing changed).

    A run's global batch (micro_batch x grad_accum x world size) is part of its trajectory: the data position is a
    sample index and every step averages the same samples whatever the number of ranks (cpt.training.data), so a
    resume on another number of GPUs continues the same run exactly when the global batch is kept. The params'
    grad_accum is therefore replaced by global / (micro_batch x world_size) when the world size changed; if that is
    not a whole number, continuing would change the batch, and that is refused (ConfigError) with the values that
    work. On the same world size the params are taken as they are (a changed batch is the fingerprint's business)."""
    if not saved or "world_size" not in saved or int(saved["world_size"]) == world_size:
        return grad_accum, None
    global_batch = int(saved["micro_batch"]) * int(saved["grad_accum"]) * int(saved["world_size"])
    if global_batch == micro_batch * grad_accum * world_size:
        return grad_accum, None
    per_rank, rest = divmod(global_batch, world_size)
    if rest or per_rank % micro_batch:
        fits = [m for m in range(1, per_rank + 1) if not rest and per_rank % m == 0]
        raise ConfigError(
            f"the checkpoint was trained with a global batch of {global_batch} sequences on {saved['world_size']} "
            f"ranks; on {world_size} ranks with train.micro_batch={micro_batch} no whole grad_accum keeps it "
            + (f"(micro_batch values that do: {fits[-6:]})" if fits else f"({global_batch} is not a multiple of "
               f"{world_size})")
            + "; use those, resume on a world size that divides it, or train.resume=false to start over")
    new = per_rank // micro_batch
    return new, (f"resuming a {saved['world_size']}-rank checkpoint on {world_size} ranks: train.grad_accum "
                 f"{grad_accum} -> {new} keeps the global batch at {global_batch} sequences")
