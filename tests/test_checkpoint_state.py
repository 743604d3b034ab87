"""Checkpoint state is what it was at the save: an async save keeps the curve rows of its own step, not the rows
the training loop appends while the background write runs (issue 24, point 6)."""

import json

import torch

from cpt.training import checkpoint


def _model():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_async_save_keeps_the_curve_of_its_step(tmp_path):
    model, opt = _model()
    saver = checkpoint.Checkpointer(tmp_path, keep=2, async_save=True)
    state = {"curve": [{"step": 0}, {"step": 1}], "samples": 8}
    assert saver.save(1, model, opt, state) is None  # in flight
    state["curve"].append({"step": 2})  # the loop goes on while the write runs
    state["samples"] = 16
    final = saver.wait()
    saved = json.loads((final / checkpoint.STATE).read_text())
    assert [r["step"] for r in saved["curve"]] == [0, 1]
    assert saved["samples"] == 8 and saved["step"] == 1


def test_sync_save_is_a_snapshot_too(tmp_path):
    model, opt = _model()
    state = {"curve": [{"step": 0}]}
    final = checkpoint.Checkpointer(tmp_path, keep=2).save(1, model, opt, state)
    state["curve"].append({"step": 1})
    assert json.loads((final / checkpoint.STATE).read_text())["curve"] == [{"step": 0}]


def test_superseded_runs_do_not_pile_up(tmp_path):
    """Each params change that starts training over moves a run aside; only the newest stays (point 10)."""
    import os

    for i, reason in enumerate(["base changed", "tokenizer changed", "lr changed"]):
        (tmp_path / "step_0000004").mkdir()
        (tmp_path / "step_0000004" / "weights").write_text(str(i))
        dest = checkpoint.move_aside(tmp_path, reason)
        os.utime(dest, (1_000_000 + i, 1_000_000 + i))  # distinct times even within one second
    runs = list((tmp_path / checkpoint.SUPERSEDED).iterdir())
    assert runs == [dest]
    assert (dest / "why.txt").read_text() == "lr changed\n" and (dest / "step_0000004" / "weights").read_text() == "2"
