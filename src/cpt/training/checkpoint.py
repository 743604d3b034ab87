"""Atomic, resumable checkpoints: ``data/checkpoints/step_<N>/`` + a ``latest`` pointer, last K kept.

A checkpoint holds everything the next step depends on: model and optimizer state (full, unsharded state dicts
through ``torch.distributed.checkpoint.state_dict``, so the same files load into a plain, DDP or FSDP2 model and
into another world size), the RNG states of every rank (python, numpy, torch, cuda), and ``state.json`` (step, data
position in samples, tokens, the curve so far, the params fingerprint). The LR is a pure function of the step
(cpt.training.schedule), so the scheduler state is the step.

Atomicity: rank 0 writes into ``.tmp-step_<N>-<pid>/`` and renames the folder into place; ``state.json`` is written
last, so a folder without it is never trusted; ``latest`` is replaced atomically after the rename. A kill at any
moment leaves either the previous checkpoint or the new one, never a half one; stale temp folders are swept at the
next start.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cpt.io import atomic_open, read_json, write_json

log = logging.getLogger("cpt.stages.train")

LATEST = "latest"
STATE = "state.json"
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


def _options(rank0_loaded: bool = False) -> StateDictOptions:
    if _distributed():
        return StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=rank0_loaded)
    return StateDictOptions(full_state_dict=True)


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


def save(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         keep: int = 2) -> Path | None:
    """Collective: every rank calls it. Rank 0 writes ``step_<N>``; returns its path (None on other ranks)."""
    folder = Path(folder)
    # Every rank takes part in gathering the full state dicts (FSDP all-gathers the shards).
    model_sd = get_model_state_dict(model, options=_options())
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_options())
    rank = _rank()
    tmp = folder / f".tmp-step_{step:07d}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    _save_file(rng_state(), tmp / f"rng_{rank}.pt")
    _barrier()
    if rank != 0:
        _barrier()
        return None
    _save_file(model_sd, tmp / "model.pt")
    _save_file(optim_sd, tmp / "optimizer.pt")
    write_json(tmp / STATE, {**state, "step": step})  # last: its presence marks a complete checkpoint
    _fsync_dir(tmp)
    final = step_dir(folder, step)
    if final.exists():  # re-saving a step after a resume: move the old one aside first
        trash = folder / f".trash-{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(folder)
    with atomic_open(folder / LATEST) as fh:
        fh.write(final.name + "\n")
    prune(folder, keep)
    _barrier()
    return final


def complete(path: Path) -> bool:
    return (path / STATE).exists() and (path / "model.pt").exists() and (path / "optimizer.pt").exists()


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
    """Collective: load ``path`` into ``model`` / ``optimizer`` (and this rank's RNG). Returns ``state.json``."""
    path = Path(path)
    distributed = _distributed()
    rank = _rank()
    # With several ranks only rank 0 reads the files; set_*_state_dict broadcasts (and shards, under FSDP).
    model_sd = torch.load(path / "model.pt", map_location="cpu", weights_only=True) if rank == 0 or not distributed else {}
    set_model_state_dict(model, model_sd, options=_options(rank0_loaded=distributed))
    if optimizer is not None:
        optim_sd = (
            torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            if rank == 0 or not distributed else {}
        )
        set_optimizer_state_dict(model, optimizer, optim_sd, options=_options(rank0_loaded=distributed))
    rng_file = path / f"rng_{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))  # our own file: RNG tuples
    return read_state(path)


def prune(folder: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete older ones and stray temp folders."""
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


def move_aside(folder: Path, reason: str) -> Path | None:
    """Move every checkpoint (and the step log) of a run that can no longer be continued into
    ``superseded/<time>/`` with ``why.txt``, instead of deleting them: a changed base or tokenizer starts a fresh
    run, and the old run stays inspectable (delete the folder to reclaim the space). Returns where they went."""
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
