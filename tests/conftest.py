"""Shared fixtures. The real corpora live in ../shared/corpora (override with CPT_CORPORA); tests read slices of
them and never copy them into the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Before torch loads: spinning OpenMP threads cost up to 40x on a busy 2-core box (measured, see cpt.training.tiny).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("CPT_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def corpora() -> Path:
    path = Path(os.environ.get("CPT_CORPORA", REPO.parent / "shared" / "corpora")).resolve()
    if not (path / "README.md").exists():
        pytest.fail(f"corpora not found at {path}: put ../shared beside the repo or set CPT_CORPORA")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is several times faster than two that wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
