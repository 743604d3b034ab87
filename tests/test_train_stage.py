"""The train stage end to end on a micro project: outputs that HF loads and generates from, metrics and curve files,
per-step tracking, no silent retraining of a finished run, refusing to mix runs, and stopping on a NaN loss with
the last good checkpoint kept."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from cpt.ops import tracking
from cpt.errors import ConfigError
from cpt.layout import Layout
from train_fixture import make_project, tiny_params


@pytest.fixture(scope="module")
def project(tmp_path_factory, corpora):
    return make_project(tmp_path_factory.mktemp("stage_src"), corpora, tied=False)


def _layout(project, tmp_path) -> Layout:
    shutil.copytree(project / "data", tmp_path / "data")
    return Layout(tmp_path)


class Recorder(tracking.Tracker):
    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


@pytest.mark.slow
def test_train_outputs_metrics_and_no_silent_retrain(project, tmp_path):
    import cpt.stages.train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    layout = _layout(project, tmp_path)
    params = tiny_params()
    rec = tracking.activate(Recorder())
    try:
        m = cpt.stages.train.run(params, layout)
    finally:
        tracking.activate(tracking.Tracker())

    # metrics/train.json content (the CLI writes the file from this dict)
    for key in ("steps", "tokens", "tokens_per_s", "loss_new", "loss_old", "bpb_new", "bpb_old",
                "old_loss_before_resize", "old_loss_after_resize"):
        assert m[key] is not None, key
    assert m["mfu"] is None and m["device"] == "cpu"  # no MFU on CPU
    assert m["steps"] == 12 and m["tokens"] == 12 * 4 * 32
    assert m["embeddings"]["rows_after"] % 64 == 0 and m["embeddings"]["rows_after"] >= m["embeddings"]["vocab"]
    # the loss went down on the new language during these few steps
    rows = list(csv.DictReader((layout.metrics / "train_curve.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 4, 8, 12]
    assert list(rows[0]) == ["step", "tokens", "lr", "loss_new", "loss_old", "bpb_new", "bpb_old", "train_loss"]
    assert float(rows[-1]["loss_new"]) < float(rows[0]["loss_new"])
    assert float(rows[0]["loss_old"]) == pytest.approx(m["old_loss_after_resize"], rel=0.2)  # first row: resized model
    # per-step tracking with the documented keys
    steps = [(s, d) for s, d in rec.metrics if "loss/new" in d]
    assert [s for s, _ in steps] == list(range(1, 13))
    assert {"loss/new", "loss/old", "bpb/new", "bpb/old", "lr", "tokens_per_s"} <= set(steps[0][1])
    assert any("val_loss/new" in d for _, d in rec.metrics)

    # the exported folder loads with Auto* and generates, with the extended tokenizer
    tok = AutoTokenizer.from_pretrained(layout.model)
    model = AutoModelForCausalLM.from_pretrained(layout.model)
    new_tokens = json.loads((layout.tokenizer / "new_tokens.json").read_text())
    assert len(tok) == new_tokens["vocab"]
    assert model.get_input_embeddings().weight.shape[0] == m["embeddings"]["rows_after"]
    piece = new_tokens["added"][0]["piece"]
    ids = tok(f"Hà Nội {piece}", return_tensors="pt").input_ids
    assert new_tokens["added"][0]["id"] in ids[0].tolist()
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert not model.config.tie_word_embeddings  # an untied base stays untied

    # a second run with the same params does not retrain: it re-exports from the final checkpoint (and the curve:
    # dvc repro deletes a stage's outputs before running it)
    shutil.rmtree(layout.model)
    curve_before = (layout.metrics / "train_curve.csv").read_text()
    (layout.metrics / "train_curve.csv").unlink()
    n_lines = len((layout.checkpoints / "steps.jsonl").read_text().splitlines())
    again = cpt.stages.train.run(params, layout)
    assert again["retrained"] is False and again["loss_new"] == m["loss_new"]
    assert (layout.model / "model.safetensors").exists()
    assert (layout.metrics / "train_curve.csv").read_text() == curve_before
    assert len((layout.checkpoints / "steps.jsonl").read_text().splitlines()) == n_lines

    # checkpoints of a run with other params (dvc exp run -S ...) are not continued: training starts over ...
    other = cpt.stages.train.run(tiny_params(replay_ratio=0.5, steps=4, eval_interval=2), layout)
    assert other["retrained"] and other["resumed_from"] is None and other["steps"] == 4
    # ... unless resume=force, which continues (schedule changes only) and refuses a data-mix change
    more = cpt.stages.train.run(tiny_params(replay_ratio=0.5, steps=6, eval_interval=2, resume="force"), layout)
    assert more["resumed_from"] == 4 and more["steps"] == 6
    with pytest.raises(ConfigError, match="replay_ratio"):
        cpt.stages.train.run(tiny_params(replay_ratio=0.3, steps=6, resume="force"), layout)


@pytest.mark.slow
def test_nan_loss_stops_with_the_last_good_checkpoint(project, tmp_path, monkeypatch):
    import cpt.stages.train
    from cpt.training.loss import CausalLMLoss

    layout = _layout(project, tmp_path)
    params = tiny_params()
    real_forward = CausalLMLoss.forward
    calls = {"train": 0}

    def poisoned(self, input_ids, targets):
        total, losses = real_forward(self, input_ids, targets)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 6:  # step 6's forward: after the checkpoint at 4, before the one at 8
                return total * float("nan"), losses
        return total, losses

    monkeypatch.setattr(CausalLMLoss, "forward", poisoned)
    with pytest.raises(cpt.stages.train.TrainingDiverged, match=r"loss is nan at step 6 .*step_0000004 is kept.*resume=force"):
        cpt.stages.train.run(params, layout)
    assert [p.name for p in layout.checkpoints.glob("step_*")] == ["step_0000004"]
    assert not (layout.model).exists()
    monkeypatch.setattr(CausalLMLoss, "forward", real_forward)
    # the user lowers the LR and continues from the good checkpoint
    m = cpt.stages.train.run(tiny_params(lr=1e-3, resume="force"), layout)
    assert m["resumed_from"] == 4 and m["steps"] == 12
