"""cpt.ops.tracking against a real MLflow store (embedded SQLite). A tracking store that is down never fails or stalls a
stage: a dead port here; a server started mid-stage in test_flows_servers.py (it shares that module's server)."""

from __future__ import annotations

import json
import time

import pytest

from cpt.io import write_json
from cpt.ops import gate, tracking
from cpt.cli import run_stage
from cpt.layout import Layout
from test_flows_support import free_port, mlflow_db

FAST = {"flush_interval": 0.2, "close_timeout": 1.0, "http_timeout": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module; tests use their own experiments."""
    path = tmp_path_factory.mktemp("mlstore")
    mlflow_db(path)
    return path


@pytest.fixture()
def project(tmp_path, store, request, monkeypatch):
    monkeypatch.delenv(tracking.ENV_PARENT, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.ENV_SWITCH, raising=False)
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    params = {"seed": 3, "train": {"lr": 3e-4, "steps": 5}, "ingest": {"sources": [{"name": "a", "lang": "vi"}]},
              "tracking": {**FAST, "uri": f"sqlite:///{store / 'mlflow.db'}", "artifact_root": str(store / "art"),
                           "experiment": request.node.name[:60]}}
    return Layout(tmp_path), params


def client(params):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=params["tracking"]["uri"])


def test_off_switches_give_the_null_tracker(project, monkeypatch):
    layout, params = project
    assert type(tracking.for_stage("train", {**params, "tracking": {"enabled": False}}, layout)) is tracking.Tracker
    monkeypatch.setenv(tracking.ENV_SWITCH, "0")
    assert type(tracking.for_stage("train", params, layout)) is tracking.Tracker


def test_stage_run_nests_under_a_grouped_parent_with_history_params_tags_artifacts(project):
    layout, params = project
    (layout.metrics).mkdir()
    (layout.root / "reports").mkdir()
    (layout.root / "reports" / "fertility.md").write_text("| lang | fertility |\n")
    tr = tracking.for_stage("tokenizer", params, layout)
    for step in range(4):
        tr.log_metrics({"loss/new": 4.0 - step, "lr": 1e-3}, step=step * 10)
    tr.set_tags({"note": "hi"})
    layout.metrics_file("tokenizer").write_text('{"vocab": 40000}')
    tr.close("FINISHED", {"vocab": 40000, "fertility": {"vi": 1.3, "en": 1.4}, "name": "not a number"})
    c = client(params)
    run = c.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tokenizer"
    assert [(m.step, m.value) for m in c.get_metric_history(tr.run_id, "loss/new")] == [
        (0, 4.0), (10, 3.0), (20, 2.0), (30, 1.0)]
    assert run.data.metrics["fertility/vi"] == 1.3 and "name" not in run.data.metrics
    assert run.data.params["train.lr"] == "0.0003" and json.loads(run.data.params["ingest.sources"])[0]["name"] == "a"
    assert run.data.tags["cpt.stage"] == "tokenizer" and run.data.tags["note"] == "hi"
    assert {"cpt.dvc_lock", "cpt.base_model", "cpt.device", "cpt.params_hash"} <= set(run.data.tags)
    arts = {a.path for a in c.list_artifacts(tr.run_id, "reports")} | {a.path for a in c.list_artifacts(tr.run_id, "metrics")}
    assert arts == {"reports/fertility.md", "metrics/tokenizer.json"}
    # plain `dvc repro`: stages of one (commit, params) share a parent, which carries <stage>/ metrics
    parent = c.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["cpt.pipeline_key"].startswith("repro:nogit:")
    assert parent.info.run_name == "pipeline (no git)" and parent.data.tags["cpt.dvc_exp"] == "workspace"
    # the parent gets neither every stage's final metrics nor the per-step curves: the headline comes after eval
    assert "loss/new" not in parent.data.metrics and "tokenizer/fertility/vi" not in parent.data.metrics
    assert parent.info.status == "FINISHED"  # after every stage: `dvc repro tokenizer` ends here
    tr2 = tracking.for_stage("eval", params, layout)
    assert tr2.flush(5) and client(params).get_run(parent.info.run_id).info.status == "RUNNING"  # reopened
    tr2.close("FAILED")
    assert client(params).get_run(tr2.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client(params).get_run(parent.info.run_id).info.status == "FAILED"


def test_flow_parent_from_env_and_dvc_experiments_get_their_own_parent(project, monkeypatch):
    layout, params = project
    flow_run = tracking.open_pipeline_run(params, layout, name="pipeline", tags={"cpt.flow": "pipeline"})
    assert flow_run.run_id
    monkeypatch.setenv(tracking.ENV_PARENT, flow_run.run_id)
    tr = tracking.for_stage("train", params, layout)
    tr.close("FINISHED", {"loss": 1.0})
    flow_run.close("FINISHED")
    c = client(params)
    assert c.get_run(tr.run_id).data.tags["mlflow.parentRunId"] == flow_run.run_id
    flow = c.get_run(flow_run.run_id)
    assert flow.data.tags["cpt.flow"] == "pipeline" and flow.info.status == "FINISHED"
    monkeypatch.delenv(tracking.ENV_PARENT)
    runs = {}
    for exp in ("crisp-dogs", "crisp-dogs", "brave-cats"):  # two stages of one experiment, one of another
        monkeypatch.setenv("DVC_EXP_NAME", exp)
        monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
        t = tracking.for_stage("train", params, layout)
        t.close("FINISHED", {"loss": 2.0})
        runs.setdefault(exp, set()).add(c.get_run(t.run_id).data.tags["mlflow.parentRunId"])
    assert len(runs["crisp-dogs"]) == 1 and runs["crisp-dogs"] != runs["brave-cats"]
    brave = c.get_run(runs["brave-cats"].pop())
    assert brave.info.run_name == "brave-cats" and brave.data.tags["cpt.dvc_exp"] == "brave-cats"


def _record(bpb: dict[str, float], config: dict | None = None, units: int = 10) -> dict:
    """A per-unit record (cpt.evaluation.record) of vi_x (new) and en_x (old): ``units`` units of 100 bytes at the
    given bpb, one document each, with a little spread shared by any two records."""
    import math

    from cpt.evaluation import record

    cfg = config or {"scorer": 2, "max_length": 64, "stride": 32, "batch_size": 8, "unit_bytes": 1000,
                     "device": "cpu", "dtype": "fp32"}
    return {name: record.entry(name, lang, domain, [f"{name} {i}" for i in range(units)], list(range(units)),
                               [(bpb[name] + 0.01 * (i % 3 - 1)) * math.log(2) * 100 for i in range(units)],
                               [100] * units, cfg)
            for name, lang, domain in (("vi_x", "vi", "new"), ("en_x", "en", "old"))}


def test_registry_gate_promotes_then_keeps_the_champion(project, tmp_path, monkeypatch):
    import tempfile

    layout, params = project
    params = {**params, "gate": {"min_gain": 0.1, "max_forgetting": 0.05},
              "ingest": {"sources": [{"name": "vi_x", "lang": "vi", "domain": "new"},
                                     {"name": "en_x", "lang": "en", "domain": "old"}]},
              "tracking": {**params["tracking"], "model_name": f"m-{tmp_path.name[:40]}"}}
    layout.model.mkdir(parents=True)
    (layout.model / "config.json").write_text('{"model_type": "llama"}')
    (layout.model / "model.safetensors").write_bytes(b"\0" * 64)
    scratch = tmp_path / "scratch"  # where the registry's temporary champion copies go
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def evaluate(new_cpt, old_cpt, config=None, rescore=None):
        g, f = 2.0 - new_cpt, old_cpt - 1.0
        m = {"base": {"vi_x": {"bpb": 2.0, "bytes": 1000}, "en_x": {"bpb": 1.0, "bytes": 1000}},
             "cpt": {"vi_x": {"bpb": new_cpt, "bytes": 1000}, "en_x": {"bpb": old_cpt, "bytes": 1000}},
             "sources": {"vi_x": {"lang": "vi", "domain": "new", "gain": g, "gain_ci95": [g - 0.01, g + 0.01],
                                  "documents": 10},
                         "en_x": {"lang": "en", "domain": "old", "forgetting": f,
                                  "forgetting_ci95": [f - 0.01, f + 0.01], "documents": 10}},
             "gain": {"vi": g}, "gain_ci95": {"vi": [g - 0.01, g + 0.01]},
             "forgetting": {"en": f}, "forgetting_ci95": {"en": [f - 0.01, f + 0.01]}}
        write_json(gate.sources_path(layout), _record({"vi_x": new_cpt, "en_x": old_cpt}, config))  # eval writes it
        tr = tracking.for_stage("eval", params, layout)
        d = gate.run(params, layout, m, tr, rescore=rescore)
        tr.close("FINISHED", m)
        return d, tr

    first, tr1 = evaluate(1.5, 1.0)
    assert first["promoted"] and first["version"] == "1" and first["vs_champion"]["checked"] is False
    second, _ = evaluate(1.7, 1.0)  # beats the base by 0.3 but is 0.2 worse than the champion
    assert second["passed"] is False and second["version"] == "2" and not second["promoted"]
    vs = second["vs_champion"]
    assert vs["checked"] and vs["how"].startswith("its stored per-unit scores") and vs["gain"] == pytest.approx(-0.2)
    assert vs["per_source"]["vi_x"]["decision"] == "refuse" and vs["per_source"]["en_x"]["decision"] == "promote"
    refused = client(params).get_model_version(params["tracking"]["model_name"], "2")
    assert refused.description.startswith("refuse: ") and "champion" in refused.description.split(" | ")[0]
    assert refused.tags["cpt.gate.decision"] == "refuse" and refused.tags["cpt.gate.min_gain"] == "0.1"
    c = client(params)
    champ = c.get_model_version_by_alias(params["tracking"]["model_name"], "champion")
    assert str(champ.version) == "1" and champ.run_id == tr1.run_id
    # the gate's record is an artifact of the eval run (not a JSON tag on the version), per unit, with its hashes
    assert "cpt.gate.sources" not in champ.tags
    local = c.download_artifacts(tr1.run_id, "gate/sources.json", str(tmp_path))
    stored = json.loads(open(local).read())
    assert stored["vi_x"]["bpb"] == pytest.approx(1.5, abs=0.002) and len(stored["vi_x"]["units"]["nll"]) == 10
    assert stored["vi_x"]["hash"]
    assert json.loads(layout.metrics_file("gate").read_text())["version"] == "2"
    # the registered version is the HF folder
    names = {a.path for a in c.list_artifacts(tr1.run_id, "model")}
    assert names == {"model/config.json", "model/model.safetensors"}
    assert c.get_run(tr1.run_id).data.metrics["gate/promoted"] == 1.0
    # a candidate scored under another eval configuration (same bytes): the champion is downloaded from the
    # registry, re-scored on the candidate's units, and the copy deleted
    seen = []
    other = {"scorer": 2, "max_length": 128, "stride": 64, "batch_size": 8, "unit_bytes": 1000, "device": "cpu",
             "dtype": "fp32"}

    def rescore(folder):
        seen.append(sorted(p.name for p in folder.iterdir()))
        return _record({"vi_x": 1.6, "en_x": 1.0}, other)

    third, _ = evaluate(1.4, 1.0, config=other, rescore=rescore)
    assert seen == [["config.json", "model.safetensors"]]
    assert third["vs_champion"]["checked"] and third["vs_champion"]["how"] == "re-scored on this eval set"
    assert third["decision"] == "promote" and third["promoted"] and third["version"] == "3"
    assert not list(scratch.glob("cpt-champion-*"))  # the downloaded copy is gone


def test_run_stage_failure_closes_the_run_failed(project, monkeypatch):
    layout, params = project
    import sys
    import types

    mod = types.ModuleType("cpt.stages.boom")

    def run(params, layout):
        tracking.current().log_metrics({"loss/new": 1.0}, step=1)
        raise RuntimeError("boom")

    mod.run = run
    monkeypatch.setitem(sys.modules, "cpt.stages.boom", mod)
    opened = []
    real = tracking.for_stage
    monkeypatch.setattr(tracking, "for_stage", lambda *a: opened.append(real(*a)) or opened[-1])
    with pytest.raises(RuntimeError):
        run_stage("boom", params, layout)
    assert client(params).get_run(opened[0].run_id).info.status == "FAILED"
    assert type(tracking.current()) is tracking.Tracker


def test_dead_server_never_stalls_the_stage_and_spools_for_replay(project):
    layout, params = project
    dead = {**params, "tracking": {**params["tracking"], "uri": f"http://127.0.0.1:{free_port()}"}}
    started = time.monotonic()
    tr = tracking.for_stage("train", dead, layout)
    for step in range(50):
        tr.log_metrics({"loss/new": 1.0 / (step + 1)}, step=step)  # must return at once
    logging_s = time.monotonic() - started
    (layout.metrics).mkdir()
    layout.metrics_file("train").write_text('{"loss": 0.1}')
    tr.close("FINISHED", {"loss": 0.1})
    total_s = time.monotonic() - started
    assert logging_s < 0.5
    assert total_s < 15  # close retried for close_timeout (1 s) plus at most one in-flight request, then spooled
    spooled = sorted((layout.data / "tracking_spool").glob("*.jsonl"))
    assert len(spooled) == 1 and (layout.data / "tracking_spool" / (spooled[0].stem + ".files")).is_dir()
    header = json.loads(spooled[0].read_text().splitlines()[0])
    assert header["run_id"] is None and "Connection" in " ".join(header["failures"]) or header["failures"]
    layout.metrics_file("train").write_text('{"loss": "changed later"}')  # the replay sends what the stage wrote
    # the store is back (here: the SQLite store configured now): the replay creates the run with everything
    results = tracking.replay(tracking.settings(params, layout))
    assert len(results) == 1 and results[0][1], results
    assert not list((layout.data / "tracking_spool").glob("*.jsonl"))
    c = client(params)
    run_id = results[0][2].split()[-1]
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and "from spool" in run.data.tags["cpt.tracking.replayed"]
    assert len(c.get_metric_history(run_id, "loss/new")) == 50
    local = c.download_artifacts(run_id, "metrics/train.json", str(layout.root))
    assert json.loads(open(local).read()) == {"loss": 0.1}


def test_a_refused_operation_is_dropped_not_blocking_the_rest(project):
    layout, params = project
    tr = tracking.for_stage("train", params, layout)
    tr.log_params({"train.lr": 0.5, "train.extra": "x"})  # train.lr was logged from params (3e-4): a conflict
    tr.log_metrics({"loss/new": 1.0}, step=1)
    tr.log_artifact(layout.root / "missing.txt")  # gone before it is sent: skipped with a warning
    tr.log_metrics({"loss/new": 0.5}, step=2)
    tr.close("FINISHED")
    c = client(params)
    run = c.get_run(tr.run_id)
    assert run.data.params["train.lr"] == "0.0003" and run.data.params["train.extra"] == "x"
    assert json.loads(run.data.tags["cpt.tracking.param_conflicts"]) == {"train.lr": ["0.0003", "0.5"]}
    assert [m.value for m in c.get_metric_history(tr.run_id, "loss/new")] == [1.0, 0.5]
    assert run.info.status == "FINISHED"


def test_replay_cli_reports_what_it_did(project, capsys):
    layout, params = project
    import yaml

    (layout.root / "params.yaml").write_text(yaml.safe_dump(params))
    assert tracking.main(["replay", "--root", str(layout.root)]) == 0
    assert "nothing to replay" in capsys.readouterr().out
    dead = {**params, "tracking": {**params["tracking"], "uri": f"http://127.0.0.1:{free_port()}"}}
    tracking.for_stage("clean", dead, layout).close("FINISHED", {"docs": 3})  # spooled
    assert tracking.main(["replay", "--root", str(layout.root)]) == 0  # params.yaml points at the live store
    out = capsys.readouterr().out
    assert out.startswith("ok ") and "replayed into run" in out


def test_gate_promotes_a_model_under_its_own_registered_name(project, tmp_path):
    """The sft stage registers its model under sft.model_name, through the same gate (cpt.ops.gate.promote)."""
    layout, params = project
    params = {**params, "tracking": {**params["tracking"], "model_name": f"m-{tmp_path.name[:30]}"}}
    folder = tmp_path / "sft_model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    m = {"base": {"sft_heldout_vi": {"bpb": 2.0, "bytes": 100, "domain": "new"},
                  "en_x": {"bpb": 1.0, "bytes": 100, "domain": "old"}},
         "cpt": {"sft_heldout_vi": {"bpb": 1.5, "bytes": 100, "domain": "new"},
                 "en_x": {"bpb": 1.01, "bytes": 100, "domain": "old"}},
         # the gate decides on intervals (cpt.evaluation.uncertainty; the sft stage computes them the same way)
         "sources": {"sft_heldout_vi": {"lang": "vi", "gain_ci95": [0.4, 0.6], "documents": 40},
                     "en_x": {"lang": "en", "forgetting_ci95": [0.0, 0.02], "documents": 12}}}
    name = f"s-{tmp_path.name[:30]}"
    tr = tracking.for_stage("sft", params, layout)
    d = gate.promote({**params, "gate": {"min_gain": 0.1, "max_forgetting": 0.05}}, m, tr, folder, name)
    tr.close("FINISHED", {})
    assert d["promoted"] and d["registered_model"] == name and d["version"] == "1"
    c = client(params)
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"
    # every version described, decision first (the registry list cuts descriptions short), budgets as tags
    version = c.get_model_version(name, "1")
    assert version.description.startswith("promote (alias champion): every source and language within budget")
    assert "budgets: min_gain 0.1, max_forgetting 0.05" in version.description
    assert "gain: vi +0.500" in version.description or "gain: sft_heldout_vi" not in version.description
    assert version.tags["cpt.gate.min_gain"] == "0.1" and version.tags["cpt.gate.max_forgetting"] == "0.05"
    assert version.tags["cpt.gate.decision"] == "promote"
    assert not c.search_model_versions(f"name='{params['tracking']['model_name']}'")


def test_each_execution_gets_its_own_parent_named_uniquely(project, monkeypatch):
    """Two `dvc repro` of the same commit and params are two executions (two dvc processes): two parents, the
    second named "... #2"; the stages of one execution share theirs."""
    layout, params = project
    from cpt.ops import execution

    parents = []
    for run in ("dvc:101:5", "dvc:102:9"):
        monkeypatch.setattr(tracking, "execution_id", lambda run=run: run)
        ids = set()
        for stage, p in (("train", params), ("eval", {**params, "seed": 4})):  # params edited mid-run: same run
            t = tracking.for_stage(stage, p, layout)
            t.close("FINISHED", {"loss": 1.0})
            ids.add(client(params).get_run(t.run_id).data.tags["mlflow.parentRunId"])
        assert len(ids) == 1
        parents.append(client(params).get_run(ids.pop()))
    assert parents[0].info.run_id != parents[1].info.run_id
    assert parents[0].info.run_name == "pipeline (no git)" and parents[1].info.run_name == "pipeline (no git) #2"
    assert parents[1].data.tags["cpt.execution"] == "dvc:102:9"
    assert execution.is_dvc(["/x/.venv/bin/python", "/x/.venv/bin/dvc", "repro"])
    assert execution.is_dvc(["python", "-m", "dvc", "exp", "run"]) and not execution.is_dvc(["python", "-m", "cpt"])


def test_execution_is_the_dvc_process_that_runs_the_stages(tmp_path):
    """Stage commands started by one `dvc` process (through a shell) name the same execution; another `dvc`
    process is another execution."""
    import subprocess
    import sys

    probe = "from cpt.ops.execution import execution_id; print(execution_id())"
    fake = tmp_path / "dvc"  # argv[1] of this process is .../dvc, as for .venv/bin/dvc
    fake.write_text("import os, subprocess, sys\n"
                    "env = {**os.environ, 'DVC_STAGE': 'x'}\n"
                    f"for _ in range(2): subprocess.run(['sh', '-c', sys.executable + ' -c \"{probe}\"'], env=env)\n")
    runs = [subprocess.run([sys.executable, str(fake)], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]
    assert all(len(r) == 2 and r[0] == r[1] and r[0].startswith("dvc:") for r in runs), runs
    assert runs[0][0] != runs[1][0]
