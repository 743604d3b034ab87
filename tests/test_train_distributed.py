"""2 processes on CPU (gloo, launched by torchrun as a user would) give the single-process loss for the same global
batch, with DDP and with FSDP2, within float tolerance (the reduction order differs, so not bit for bit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cpt.layout import Layout
from train_fixture import make_project, tiny_params

# One torchrun launch runs both DDP and FSDP2 (torch + transformers import once per rank, not four times).
WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    dist.init_process_group("gloo")
    import cpt.stages.train
    from cpt.layout import Layout
    params = json.loads(os.environ["PARAMS"])
    for parallel in ("ddp", "fsdp"):
        p = {**params, "train": {**params["train"], "parallel": parallel}}
        metrics = cpt.stages.train.run(p, Layout(os.path.join(sys.argv[1], parallel)))
        if dist.get_rank() == 0:
            with open(os.path.join(sys.argv[1], parallel + ".json"), "w") as fh:
                json.dump(metrics, fh)
    dist.destroy_process_group()
    """
)


def _steps(layout: Layout) -> list[dict]:
    return [json.loads(x) for x in (layout.checkpoints / "steps.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, corpora):
    import cpt.stages.train

    src = make_project(tmp_path / "src", corpora, tied=True)
    params = tiny_params(steps=6, eval_interval=3, ckpt_interval=3, micro_batch=4)
    single = Layout(tmp_path / "single")
    shutil.copytree(src / "data", single.root / "data")
    ref = cpt.stages.train.run(params, single)

    for parallel in ("ddp", "fsdp"):
        shutil.copytree(src / "data", tmp_path / "multi" / parallel / "data")
    multi_params = tiny_params(steps=6, eval_interval=3, ckpt_interval=3, micro_batch=2)  # 2 ranks x 2 = 4
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PARAMS": json.dumps(multi_params), "CPT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(tmp_path / "multi")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref_steps = _steps(single)
    for parallel in ("ddp", "fsdp"):
        layout = Layout(tmp_path / "multi" / parallel)
        got = json.loads((tmp_path / "multi" / f"{parallel}.json").read_text())
        assert got["world_size"] == 2 and got["tokens"] == ref["tokens"]
        steps = _steps(layout)
        assert len(steps) == len(ref_steps) == 6
        for a, b in zip(steps, ref_steps):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (parallel, a["step"])
            assert a["loss/old"] == pytest.approx(b["loss/old"], rel=1e-5), (parallel, a["step"])
        for key in ("loss_new", "loss_old", "old_loss_after_resize"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5), (parallel, key)
        # the exported model is the full (unsharded) model, loadable like the single-process one
        from safetensors.torch import load_file

        a = load_file(layout.model / "model.safetensors")
        b = load_file(single.model / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].shape == b[k].shape
            assert (a[k] - b[k]).abs().max() < 1e-4, (parallel, k)
