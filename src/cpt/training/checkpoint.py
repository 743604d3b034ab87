"""Sharded, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP): ``data/checkpoints/step_<N>/`` + a
``latest`` pointer, last K kept.

A checkpoint holds everything the next step depends on: model and optimizer state, the RNG states of every rank
(python, numpy, torch, cuda) and ``state.json`` (step, data position in samples, tokens, the curve so far, the params
fingerprint, the world size and batch). The LR is a pure function of the step (cpt.training.schedule), so the
scheduler state is the step.

Why DCP: every rank writes only its own shards (``__<rank>_0.distcp``; FSDP2's DTensors, a replicated DDP tensor
once) in parallel, so a 7B run never gathers ~84 GB of fp32 weights + Adam moments into one process; and loading
reads whatever each rank needs for the CURRENT layout, so a checkpoint of 2 FSDP ranks loads into 1 process, into
DDP, or into 8 ranks (DCP reshards from the saved global shapes and offsets). The state dicts come from
``torch.distributed.checkpoint.state_dict`` (wrapper-free names: no ``module.`` / ``_orig_mod.`` prefixes).

Atomicity: every rank writes into ``.tmp-step_<N>/``; once DCP's ``.metadata`` is written (the coordinator writes it
after every rank's data is on disk) rank 0 writes ``state.json`` and renames the folder into place; ``latest`` is
replaced atomically after the rename. A folder without ``state.json`` and ``.metadata`` is never trusted, and stale
temp folders are swept at the next start. With ``async_save`` (``train.async_checkpoint``) the state is copied to CPU
memory and written by a background thread while training goes on; the checkpoint becomes valid (state.json, rename)
only when the write has finished, checked at the next save and at the end (``Checkpointer.wait``). A kill at any
moment leaves the previous checkpoint or the new one, never a half one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cpt.io import atomic_open, read_json, write_json

log = logging.getLogger("cpt.train")

LATEST = "latest"
STATE = "state.json"
METADATA = ".metadata"  # DCP's index, written once every rank's data is on disk
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{step:07d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every single-process save and load (``no_dist``), which is cpt's normal one-GPU case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """{"model": ..., "optim": ...} as each rank holds it (DTensor shards under FSDP2): what DCP saves and loads."""
    from cpt.training.distributed import reshard

    reshard(model)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


class Checkpointer:
    """Saves ``step_<N>`` checkpoints into ``folder``; collective (every rank calls every method).

    One save is in flight at a time: with ``async_save`` a save first waits for the previous one to be complete."""

    def __init__(self, folder: Path, keep: int = 2, async_save: bool = False):
        self.folder = Path(folder)
        self.keep = keep
        self.async_save = async_save
        self._pending: tuple[Any, Path, int, dict] | None = None
        self._group = None
        if async_save and _distributed():
            # the background writer's collectives must not interleave with training's on the default group
            self._group = dist.new_group(backend="gloo")

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path | None:
        """Write ``step_<N>``; returns its path on rank 0 once complete (None on other ranks, or while an async
        save is still being written).

        ``state`` is copied now: the caller keeps appending to its curve while an async save is written, and the
        checkpoint must hold the rows of ``step`` and before, or a resume from it duplicates the later ones."""
        self.wait()
        state = copy.deepcopy(state)
        rank = _rank()
        tmp = self.folder / f".tmp-step_{step:07d}"
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        _save_file(rng_state(), tmp / f"rng_{rank}.pt")
        sd = sharded_state(model, optimizer)
        if self.async_save:
            with quiet_single_process():
                future = dcp.async_save(sd, checkpoint_id=str(tmp), process_group=self._group,
                                        no_dist=not _distributed())
            self._pending = (future, tmp, step, state)
            return None
        with quiet_single_process():
            dcp.save(sd, checkpoint_id=str(tmp), no_dist=not _distributed())
        final = self._finish(tmp, step, state)
        _barrier()
        return final

    def poll(self) -> Path | None:
        """Make the in-flight async save a valid checkpoint if its write has finished (called every step, so a kill
        after the write loses nothing); never blocks."""
        if self._pending is not None and self._pending[0].done():
            return self.wait()
        return None

    def wait(self) -> Path | None:
        """Block until the in-flight async save is written, then make it a valid checkpoint."""
        if self._pending is None:
            return None
        future, tmp, step, state = self._pending
        self._pending = None
        future.result()
        return self._finish(tmp, step, state)

    def _finish(self, tmp: Path, step: int, state: dict) -> Path | None:
        if _rank() != 0:
            return None
        write_json(tmp / STATE, {**state, "step": step})  # last: with .metadata, it marks a complete checkpoint
        _fsync_dir(tmp)
        final = step_dir(self.folder, step)
        if final.exists():  # re-saving a step after a resume: move the old one aside first
            trash = self.folder / f".trash-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        with atomic_open(self.folder / LATEST) as fh:
            fh.write(final.name + "\n")
        prune(self.folder, self.keep)
        return final


def save(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         keep: int = 2) -> Path | None:
    """Collective, synchronous: every rank writes its shards of ``step_<N>``; returns its path on rank 0."""
    return Checkpointer(folder, keep).save(step, model, optimizer, state)


def complete(path: Path) -> bool:
    return (path / STATE).exists() and (path / METADATA).exists()


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.exists():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(folder: Path) -> Path | None:
    """The checkpoint to resume from: the highest complete ``step_<N>``. The ``latest`` pointer says the same for
    people and tools; the scan is what we trust, since a kill can land between the rename and the pointer update."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def read_state(path: Path) -> dict:
    return read_json(Path(path) / STATE)


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Collective: load ``path`` into ``model`` / ``optimizer`` in their current layout (any world size or parallel
    mode: DCP reads each rank's slices), and this rank's RNG if the checkpoint has it. Returns ``state.json``."""
    path = Path(path)
    sd = sharded_state(model, optimizer)
    with quiet_single_process():
        dcp.load(sd, checkpoint_id=str(path), no_dist=not _distributed())
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd["optim"])
    rng_file = path / f"rng_{_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))  # our own file: RNG tuples
    return read_state(path)


def prune(folder: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete older ones."""
    found = list_checkpoints(folder)
    for _, p in found[: max(0, len(found) - max(1, keep))]:
        shutil.rmtree(p, ignore_errors=True)


def sweep_temp(folder: Path) -> int:
    """Remove temp / trash folders a killed save left behind. Returns how many."""
    folder = Path(folder)
    if not folder.exists():
        return 0
    n = 0
    for p in folder.iterdir():
        if p.name.startswith((".tmp-step_", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


SUPERSEDED = "superseded"


def move_aside(folder: Path, reason: str, keep: int = 1) -> Path | None:
    """Move every checkpoint (and the step log) of a run that can no longer be continued into
    ``superseded/<time>/`` with ``why.txt``, instead of deleting them: a changed base or tokenizer starts a fresh
    run, and the old run stays inspectable. Only the newest ``keep`` superseded runs stay (each is a full model +
    optimizer state, ~3x the model: on a 7B model one is ~80 GB, so they must not pile up with every params change).
    Returns where they went."""
    folder = Path(folder)
    if not folder.exists():
        return None
    items = [p for p in folder.iterdir() if _STEP_DIR.match(p.name) or p.name in (LATEST, "steps.jsonl")]
    if not items:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = folder / SUPERSEDED / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = folder / SUPERSEDED / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for p in items:
        os.replace(p, dest / p.name)
    (dest / "why.txt").write_text(reason + "\n", encoding="utf-8")
    runs = sorted((p for p in (folder / SUPERSEDED).iterdir() if p.is_dir()), key=lambda p: (p.stat().st_mtime, p.name))
    for old in runs[: max(0, len(runs) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def clear(folder: Path) -> None:
    """Remove every checkpoint (``train.resume: false`` starts over)."""
    folder = Path(folder)
    if folder.exists():
        for p in folder.iterdir():
            if _STEP_DIR.match(p.name) or p.name.startswith((".tmp-step_", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)
            elif p.name == LATEST:
                p.unlink()
