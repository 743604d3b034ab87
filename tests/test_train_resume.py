"""Exact resume: a run killed with SIGKILL between checkpoints and resumed gives, at every later step, the loss of
the uninterrupted run bit for bit (CPU, fp32, deterministic algorithms)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from cpt.layout import Layout
from train_fixture import make_project, tiny_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, corpora) -> Path:
    return make_project(tmp_path_factory.mktemp("resume_src"), corpora)


def _copy(src: Path, dst: Path) -> Layout:
    shutil.copytree(src / "data", dst / "data")
    return Layout(dst)


def _steps(layout: Layout) -> dict[int, dict]:
    rows = [json.loads(x) for x in (layout.checkpoints / "steps.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in rows}


# The child runs the real CLI (`cpt train`) in a fresh interpreter; a tracker hook sends SIGKILL to the process
# itself right after step KILL_AT has been logged: a real kill -9, between the checkpoints at 4 and 8, at a step
# that is deterministic (a timer-based kill from outside would race a micro model that does 100 steps/s).
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from cpt.ops import tracking
    class Killer(tracking.Tracker):
        def log_metrics(self, metrics, step=None):
            if step == int(os.environ["KILL_AT"]) and "loss" in metrics:
                os.kill(os.getpid(), signal.SIGKILL)
    tracking.for_stage = lambda *a, **k: Killer()
    from cpt.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sigkill_then_resume_is_bit_identical(project, tmp_path, method):
    """lora: the adapter, the new rows, AdamW's state, LoRA dropout's RNG and the sampler come back exactly."""
    import cpt.stages.train

    params = tiny_params(method=method, embed_only_steps=2 if method == "lora" else 0)
    # 1. the uninterrupted run, in-process
    ref = _copy(project, tmp_path / "ref")
    ref_metrics = cpt.stages.train.run(params, ref)
    ref_steps = _steps(ref)
    assert sorted(ref_steps) == list(range(1, 13))

    # 2. the same run in a subprocess, SIGKILLed after step 6 (checkpoints at 4 and 8)
    run_dir = tmp_path / "killed"
    killed = _copy(project, run_dir)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "KILL_AT": "6", "CPT_PROGRESS": "0", "CPT_TRACKING": "0"}
    proc = subprocess.run([sys.executable, "-c", CHILD, "train", "-p", str(run_dir / "params.yaml"), "--root", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = sorted(p.name for p in killed.checkpoints.glob("step_*"))
    assert ckpts == ["step_0000004"], ckpts  # killed between checkpoints: only step 4 exists
    assert max(_steps(killed)) >= 5  # it had trained past the checkpoint (those steps are redone)
    # a save interrupted half-way leaves a temp folder: it must be ignored and swept
    (killed.checkpoints / ".tmp-step_0000008").mkdir()
    (killed.checkpoints / ".tmp-step_0000008" / "model.pt").write_bytes(b"half")

    # 3. resume in-process
    metrics = cpt.stages.train.run(params, killed)
    assert metrics["resumed_from"] == 4
    assert not (killed.checkpoints / ".tmp-step_0000008").exists()
    got = _steps(killed)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step]["loss"] == ref_steps[step]["loss"], f"step {step}"
        assert got[step]["loss/old"] == ref_steps[step]["loss/old"], f"step {step}"
        assert got[step]["grad_norm"] == ref_steps[step]["grad_norm"], f"step {step}"
    for key in ("loss_new", "loss_old", "bpb_new", "bpb_old", "tokens", "old_loss_after_resize"):
        assert metrics[key] == ref_metrics[key], key
    # identical weights, too
    from safetensors.torch import load_file

    a = load_file(ref.model / "model.safetensors")
    b = load_file(killed.model / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    if method == "lora":
        for name in ("adapter_model.safetensors", "new_rows.safetensors"):
            a, b = (load_file(m / "adapter" / name) for m in (ref.model, killed.model))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the curve file holds the eval rows of both halves, same as the reference
    assert (killed.metrics / "train_curve.csv").read_text() == (ref.metrics / "train_curve.csv").read_text()
