"""What a checkpoint may be continued with: a changed base (weights, not just config.json) or tokenizer starts a
fresh run and moves the old checkpoints aside; ``resume: force`` continues with the NEW optimizer hyperparameters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cpt.layout import Layout
from train_fixture import make_project, tiny_params


@pytest.fixture(scope="module")
def project(tmp_path_factory, corpora):
    return make_project(tmp_path_factory.mktemp("fp_src"), corpora)


def _layout(project, tmp_path) -> Layout:
    shutil.copytree(project / "data", tmp_path / "data")
    return Layout(tmp_path)


def test_a_finished_run_is_not_reused_after_the_base_weights_change(project, tmp_path, one_torch_thread):
    import cpt.stages.train
    from safetensors.torch import load_file, save_file

    layout = _layout(project, tmp_path)
    params = tiny_params(steps=4, eval_interval=4, ckpt_interval=4)
    first = cpt.stages.train.run(params, layout)
    assert first["retrained"]
    # same config.json, other weights (a fine-tune of the same architecture, another base.tiny.steps, ...)
    weights = load_file(layout.base / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, layout.base / "model.safetensors", metadata={"format": "pt"})
    again = cpt.stages.train.run(params, layout)
    assert again["retrained"] and again["resumed_from"] is None  # trained anew, from the new base
    aside = list((layout.checkpoints / "superseded").iterdir())
    assert len(aside) == 1 and (aside[0] / "step_0000004").is_dir()  # moved aside, not deleted ...
    assert "base" in (aside[0] / "why.txt").read_text()  # ... and the reason written next to them


def test_a_changed_tokenizer_starts_over_too(project, tmp_path, one_torch_thread):
    import cpt.stages.train

    layout = _layout(project, tmp_path)
    params = tiny_params(steps=4, eval_interval=4, ckpt_interval=4)
    cpt.stages.train.run(params, layout)
    cfg = json.loads((layout.tokenizer / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 12345
    (layout.tokenizer / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert cpt.stages.train.run(params, layout)["resumed_from"] is None


def test_resume_force_applies_the_new_optimizer_hyperparameters(project, tmp_path, one_torch_thread):
    import cpt.stages.train

    layout = _layout(project, tmp_path)
    cpt.stages.train.run(tiny_params(steps=4, eval_interval=4, ckpt_interval=4), layout)
    forced = tiny_params(steps=8, eval_interval=4, ckpt_interval=4, resume="force", weight_decay=0.0,
                         betas=[0.8, 0.9], embed_lr_mult=0.5)
    assert cpt.stages.train.run(forced, layout)["resumed_from"] == 4
    # the optimizer state as the DCP checkpoint holds it, read whole in this one process
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(layout.checkpoints / "step_0000008", tmp_path / "full.pt")
    optim = torch.load(tmp_path / "full.pt", weights_only=False)["optim"]
    groups = {g["name"]: g for g in optim["param_groups"]}
    assert groups["decay"]["weight_decay"] == 0.0  # not the checkpoint's 0.1
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in groups.values())  # not (0.9, 0.95)
    assert groups["embed"]["lr_mult"] == 0.5  # not 1.0
    # and the LR the embeddings trained with at the last step is the multiplied one
    last = json.loads((layout.checkpoints / "steps.jsonl").read_text().splitlines()[-1])
    assert groups["embed"]["lr"] == pytest.approx(0.5 * last["lr"])


@pytest.mark.parametrize("meta_has_content", [True, False])
def test_other_shard_bytes_with_the_same_counts_start_over(project, tmp_path, one_torch_thread, meta_has_content):
    """Re-cleaned or reordered data with the same token/document counts is other data (issue 24, point 7): the
    fingerprint covers the shards' content, from meta.json's ``content`` or, for shards written before it, the files."""
    import numpy as np

    import cpt.stages.train
    from cpt.io import shards_content

    layout = _layout(project, tmp_path)
    params = tiny_params(steps=4, eval_interval=4, ckpt_interval=4)
    meta_path = layout.shards / "meta.json"
    meta = json.loads(meta_path.read_text())
    if not meta_has_content:
        meta.pop("content", None)
        meta_path.write_text(json.dumps(meta))
    assert cpt.stages.train.run(params, layout)["retrained"]
    # swap two blocks of new/train.bin: every count in meta.json stays the same
    path = layout.shards / "new" / "train.bin"
    blocks = np.fromfile(path, dtype=meta["dtype"]).reshape(-1, meta["block_size"])
    assert len(blocks) >= 2 and not np.array_equal(blocks[0], blocks[1])
    blocks[[0, 1]] = blocks[[1, 0]]
    blocks.tofile(path)
    if meta_has_content:  # what the shards stage writes for the new bytes
        meta_path.write_text(json.dumps({**meta, "content": shards_content(layout.shards)}))
    again = cpt.stages.train.run(params, layout)
    assert again["retrained"] and again["resumed_from"] is None
    assert "shards" in next((layout.checkpoints / "superseded").iterdir()).joinpath("why.txt").read_text()
