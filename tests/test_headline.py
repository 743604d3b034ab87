"""The answer where people look: metrics/summary.json, the timings split, and what MLflow shows (descriptions,
summary metrics, the loss chart, datasets, system metrics), read back through MLflow's own client."""

from __future__ import annotations

import json
import subprocess

import pytest

from cpt.layout import Layout
from cpt.ops import gate, headline, summary, timings, tracking
from test_flows_support import mlflow_db

EVAL = {"base": {"vi_x": {"bpb": 10.0, "bytes": 100}, "en_x": {"bpb": 3.0, "bytes": 100}},
        "cpt": {"vi_x": {"bpb": 2.2, "bytes": 100}, "en_x": {"bpb": 3.045, "bytes": 100}},
        "gain": {"vi": 7.8}, "forgetting": {"en": 0.045}}
# what the gate decides on (issue 9): the bootstrap intervals per language and per source
GATED = {**EVAL, "gain_ci95": {"vi": [7.6, 8.0]}, "forgetting_ci95": {"en": [0.03, 0.048]},
         "sources": {"vi_x": {"lang": "vi", "gain_ci95": [7.6, 8.0]}, "en_x": {"lang": "en", "forgetting_ci95": [0.03, 0.048]}}}


def test_timings_leave_the_results_file_and_a_rerun_rewrites_it_identically(tmp_path):
    layout = Layout(tmp_path)
    run1 = {"loss": 5.8, "seconds": 7.0, "tokens_per_s": 2370.9, "mfu": None, "resumed_from": 80,
            "timings": {"read": 1.2}, "by_source": {"a": {"docs": 3, "train_seconds": 2.0}}}
    results = timings.write(layout, "train", run1)
    assert results == {"loss": 5.8, "by_source": {"a": {"docs": 3}}}
    first = layout.metrics_file("train").read_bytes()
    timings.write(layout, "train", {**run1, "seconds": 9.9, "tokens_per_s": 1800.0, "resumed_from": None})
    assert layout.metrics_file("train").read_bytes() == first  # same inputs, same results: git stays clean
    assert json.loads(timings.timings_file(layout, "train").read_text())["tokens_per_s"] == 1800.0


def test_summary_is_small_reads_intervals_when_present_and_keeps_throughput_of_identical_results(tmp_path):
    layout = Layout(tmp_path)
    layout.metrics.mkdir()
    gate_json = {"passed": True, "vs_base": {"min_gain": 0.02, "max_forgetting": 0.05}}
    s = summary.build(EVAL, gate_json, {"tokens_per_s": 2370.94, "mfu": None})
    assert len(s) <= 12 and s["decision"] == "promote" and "gain_ci95" not in s  # issue 9's keys absent: no CI
    with_ci = summary.build({**EVAL, "gain_ci95": {"vi": [7.6, 8.0]}, "forgetting_ci95": {"en": [0.03, 0.06]}},
                            {**gate_json, "decision": "undecided"}, {})
    assert with_ci["gain_ci95"] == {"vi": [7.6, 8.0]} and with_ci["decision"] == "undecided"
    assert summary.headline(s) == "vi +7.8 bpb, en +0.045 bpb forgotten, gate passed"
    layout.metrics_file("eval").write_text(json.dumps(EVAL))
    layout.metrics_file("gate").write_text(json.dumps(gate_json))
    timings.write(layout, "train", {"tokens_per_s": 2000.0})
    assert summary.write(layout)["tokens_per_s"] == 2000.0
    timings.write(layout, "train", {"tokens_per_s": 2500.0})  # a bit-identical rerun, slower or faster
    assert summary.write(layout)["tokens_per_s"] == 2000.0
    layout.metrics_file("eval").write_text(json.dumps({**EVAL, "gain": {"vi": 7.9}}))  # a new result
    assert summary.write(layout)["tokens_per_s"] == 2500.0


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A git project with a committed params.yaml (so the parent run is named against it) and its own store."""
    for var in (tracking.ENV_PARENT, "MLFLOW_TRACKING_URI", tracking.ENV_SWITCH, "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow_db(tmp_path)
    params = {"seed": 1, "train": {"replay_ratio": 0.25},
              "ingest": {"sources": [{"name": "vi_x", "lang": "vi", "domain": "new"},
                                     {"name": "en_x", "lang": "en", "domain": "old"}]},
              "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_root": str(tmp_path / "art"),
                           "flush_interval": 0.2, "close_timeout": 5, "system_metrics_interval": 1}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@x.invalid", "commit", "-qm", "p"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    layout = Layout(tmp_path)
    layout.metrics.mkdir()
    layout.model.mkdir(parents=True)
    (layout.model / "config.json").write_text('{"model_type": "llama"}')
    return layout, params


def test_mlflow_shows_the_answer_first(project):
    from mlflow import MlflowClient

    layout, params = project
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=layout.root, capture_output=True, text=True).stdout[:7]
    params = {**params, "train": {"replay_ratio": 0.1}}  # edited since the commit
    # train: the datasets it read (DVC md5 from dvc.lock), system metrics, the old/new loss chart
    (layout.root / "dvc.lock").write_text("schema: '2.0'\nstages:\n  shards:\n    outs:\n    - path: data/shards\n"
                                          "      md5: 0123456789abcdef0123456789abcdef.dir\n")
    (layout.root / "data" / "shards").mkdir(parents=True)
    (layout.metrics / "train_curve.csv").write_text("step,tokens,loss_new,loss_old\n0,0,9.4,6.0\n80,163200,5.8,6.2\n")
    from cpt.ops.mlflow_views import stage_datasets

    tr = tracking.activate(tracking.for_stage("train", params, layout))
    tr.log_inputs(stage_datasets(layout.root, "train"))
    tr.log_metrics({"loss/new": 5.8, "loss/old": 6.2}, step=80)
    tr.flush(10)
    import time

    time.sleep(2.5)  # two system-metrics samples
    headline.loss_chart(layout, tr, {"retrained": True})
    tr.close("FINISHED", {"loss": 5.8})
    # eval + gate + headline
    layout.metrics_file("eval").write_text(json.dumps(GATED))
    ev = tracking.for_stage("eval", params, layout)
    decision = gate.run(params, layout, GATED, ev)
    headline.publish(layout, ev, decision)
    ev.close("FINISHED", EVAL)

    c = MlflowClient(tracking_uri=params["tracking"]["uri"])
    train_run = c.get_run(tr.run_id)
    parent = c.get_run(train_run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == f"replay_ratio=0.1 @ {sha}" and parent.info.status == "FINISHED"
    assert parent.data.tags["cpt.dvc_exp"] == "workspace"
    assert parent.data.tags["mlflow.note.content"].startswith("**vi +7.8 bpb, en +0.045 bpb forgotten, gate passed**")
    assert parent.data.tags["cpt.gate.decision"] == "promote"
    assert parent.data.metrics["summary/gain/vi"] == 7.8 and parent.data.metrics["summary/passed"] == 1.0
    assert all(k.startswith("summary/") for k in parent.data.metrics), sorted(parent.data.metrics)  # headline only
    exp = c.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experiment.primaryMetric.name"] == "summary/forgetting/en"
    view = json.loads(exp.tags["mlflow.sharedViewState.cpt-headline"])  # the runs table's headline columns
    assert {"metrics.`summary/forgetting/en`", "metrics.`summary/gain/vi`", "params.`train.replay_ratio`"} <= set(
        view["selectedColumns"]) and not any("ci95" in col for col in view["selectedColumns"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    version = c.get_model_version(decision["registered_model"], decision["version"])
    assert version.description == ("promote (alias champion): every source and language within budget | budgets: "
                                   "min_gain 0.02, max_forgetting 0.05, min_documents 5 | gain: vi +7.8 | forgetting: en +0.045 bpb")
    assert version.tags["cpt.gate.max_forgetting"] == "0.05"
    assert c.get_model_version_by_alias(decision["registered_model"], "champion").version == version.version
    # the chart view's image chart (old and new loss together), in the train run and the parent
    for run_id in (tr.run_id, parent.info.run_id):
        images = [a.path for a in c.list_artifacts(run_id, "images")]
        assert any(p.startswith("images/summary~loss_new_vs_old+step+80") for p in images), images  # '/' stored as '~'
        # ...and at full size, as a plain artifact that both descriptions show and link (in the training view)
        assert [a.path for a in c.list_artifacts(run_id, "charts")] == ["charts/loss_new_vs_old.png"]
        note = c.get_run(run_id).data.tags["mlflow.note.content"]
        assert f"(get-artifact?path=charts/loss_new_vs_old.png&run_uuid={run_id})" in note
        assert (f"full size: [charts/loss_new_vs_old.png](#/experiments/{parent.info.experiment_id}/runs/{run_id}"
                f"/artifacts/charts/loss_new_vs_old.png?workflowType=machine_learning)") in note
    from PIL import Image

    with Image.open(c.download_artifacts(parent.info.run_id, "charts/loss_new_vs_old.png", str(layout.root))) as im:
        assert 700 <= im.size[0] <= 760  # its natural size, in the description column (the chart card: 256 px)
    (inp,) = train_run.inputs.dataset_inputs
    assert inp.dataset.name == "token shards" and inp.dataset.digest == "0123456789abcdef0123456789abcdef.dir"
    assert any(k.startswith("system/cpu_utilization") for k in train_run.data.metrics), sorted(train_run.data.metrics)


def test_a_reexport_says_so_and_quotes_no_throughput(project):
    """train found its finished checkpoint and only re-exported it: its run says so, the headline quotes no
    throughput (the recorded one belongs to the run that trained), and summary/tokens_per_s is not logged."""
    from mlflow import MlflowClient

    layout, params = project
    (layout.metrics / "train_curve.csv").write_text("step,tokens,loss_new,loss_old\n0,0,9.4,6.0\n80,163200,5.8,6.2\n")
    timings.write(layout, "train", {"loss": 5.8, "retrained": False, "resumed_from": 80})
    (layout.metrics / "summary.json").write_text(json.dumps({"tokens_per_s": 3134.7}))
    tr = tracking.activate(tracking.for_stage("train", params, layout))
    headline.loss_chart(layout, tr, {"retrained": False, "resumed_from": 80})
    tr.close("FINISHED", {"loss": 5.8})
    layout.metrics_file("eval").write_text(json.dumps(GATED))
    ev = tracking.for_stage("eval", params, layout)
    headline.publish(layout, ev, gate.run(params, layout, GATED, ev))
    ev.close("FINISHED", EVAL)
    c = MlflowClient(tracking_uri=params["tracking"]["uri"])
    train_run = c.get_run(tr.run_id)
    assert train_run.data.tags["mlflow.note.content"].startswith("**Re-exported, not trained**")
    assert train_run.data.tags["cpt.train.retrained"] == "false"
    parent = c.get_run(train_run.data.tags["mlflow.parentRunId"])
    note = parent.data.tags["mlflow.note.content"]
    assert "throughput" not in note.replace("no throughput is quoted", "") and "tokens/s" not in note
    assert "re-exported the finished checkpoint" in note
    assert "summary/tokens_per_s" not in parent.data.metrics
