"""The Prefect flows over a real DVC project (a small one with the same stage names, so the test does not depend on
the cost of the real stages), run under ``prefect_test_harness`` (one per module, temporary PREFECT_HOME).

What matters: each task is the DVC stage (DVC decides what is up to date: a rerun skips, a param change reruns only
what depends on it), the train task retries and the retry resumes from the checkpoint DVC kept (``persist: true``),
and the flow's MLflow parent run reaches the stage processes through DVC, so stages are its nested runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cpt.stages import STAGES
from test_flows_support import REPO, base_env, mlflow_db

sys.path.insert(0, str(REPO))  # `flows` lives at the repo root, beside src/

STAGE_PY = '''
"""A toy stage with the real tracking wiring (what cpt.cli.run_stage does around a stage)."""
import json, sys
from pathlib import Path

import yaml

from cpt.ops import tracking
from cpt.layout import Layout

stage = sys.argv[1]
params = yaml.safe_load(open("params.yaml"))
layout = Layout(".")
tracker = tracking.activate(tracking.for_stage(stage, params, layout))
out = Path("data") / stage
out.mkdir(parents=True, exist_ok=True)
metrics = {"lr": params["train"]["lr"]}
if stage == "train":
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/curve.csv").write_text("step,loss_new,loss_old\\n" + "".join(
        f"{s},{2 / s / metrics['lr']},{1 + metrics['lr'] * s}\\n" for s in (4, 8)))
    attempts = Path("attempts.txt")
    n = int(attempts.read_text()) + 1 if attempts.exists() else 1
    attempts.write_text(str(n))
    latest = Path("data/checkpoints/latest")
    resumed = latest.exists()
    latest.parent.mkdir(parents=True, exist_ok=True)
    latest.write_text("step_5")
    tracker.log_metrics({"loss/new": 2.0 / n}, step=5 * n)
    if n <= params["train"]["fail_attempts"]:
        tracker.close("FAILED")
        sys.exit("simulated preemption at step 5")
    metrics.update(attempt=n, resumed=resumed)
(out / "out.txt").write_text(json.dumps(metrics))
Path("metrics").mkdir(exist_ok=True)
Path(f"metrics/{stage}.json").write_text(json.dumps(metrics))
tracker.close("FINISHED", metrics)
'''

DVC_YAML = '''
stages:
  ingest:
    cmd: python stage.py ingest
    deps: [stage.py]
    params: [seed]
    outs: [data/ingest]
    metrics: [{metrics/ingest.json: {cache: false}}]
  train:
    cmd: python stage.py train
    deps: [stage.py, data/ingest]
    params: [train]
    outs:
      - data/train
      - data/checkpoints: {persist: true, cache: false}
    metrics: [{metrics/train.json: {cache: false}}]
    plots: [{metrics/curve.csv: {cache: false}}]
  eval:
    cmd: python stage.py eval
    deps: [stage.py, data/train]
    outs: [data/eval]
    metrics: [{metrics/eval.json: {cache: false}}]
plots:
  - loss:
      x: step
      y:
        metrics/curve.csv: [loss_new, loss_old]
'''


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """One Prefect test API for the module (~12 s to start), with its own PREFECT_HOME."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect_home")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield home


@pytest.fixture(scope="module")
def toy(harness, tmp_path_factory):
    """The small DVC project, run once through the `pipeline` flow (tracked; train fails once, then resumes).
    The tests below read that run, then change params and run again (in file order, on the same project)."""
    import os

    root = tmp_path_factory.mktemp("toy") / "proj"
    root.mkdir()
    (root / "stage.py").write_text(STAGE_PY)
    (root / "dvc.yaml").write_text(DVC_YAML)
    mlflow_db(root)
    (root / "params.yaml").write_text(textwrap.dedent("""\
        seed: 1
        train:
          lr: 0.1  # peak LR
          fail_attempts: 1
        tracking:
          uri: sqlite:///mlflow.db
          flush_interval: 0.2
          close_timeout: 2
        """))
    (root / ".gitignore").write_text("/data/\n/mlflow.db\n/mlartifacts/\n/attempts.txt\n")
    env = base_env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x.invalid", GIT_COMMITTER_NAME="t",
                   GIT_COMMITTER_EMAIL="t@x.invalid")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "toy"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    saved = {v: os.environ.pop(v) for v in ("CPT_MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "CPT_TRACKING",
                                            "DVC_EXP_NAME") if v in os.environ}
    from flows.pipeline import pipeline

    try:
        results = pipeline(root=str(root), stages=["ingest", "train", "eval"], retry_delay=0, train_retries=1)
        yield root, results
    finally:
        os.environ.update(saved)


def mlflow_client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def test_one_task_per_stage_named_as_the_stage():
    from flows import pipeline

    assert list(pipeline.STAGE_TASKS) == list(STAGES)
    assert all(t.name == s for s, t in pipeline.STAGE_TASKS.items())
    assert pipeline.DATA_PREP + ("train", "eval", "downstream", "merge", "sft") == STAGES
    assert {f.name for f in (pipeline.data_prep, pipeline.train, pipeline.evaluate, pipeline.pipeline)} == {
        "data_prep", "train", "evaluate", "pipeline"}
    with pytest.raises(ValueError, match="unknown stages"):
        pipeline._selected(STAGES, ["ingest", "trian"])


def test_train_retry_resumes_and_stages_nest_under_the_flow_run(toy):
    root, results = toy
    assert [(r["stage"], r["ran"]) for r in results] == [("ingest", True), ("train", True), ("eval", True)]
    train = json.loads((root / "metrics" / "train.json").read_text())
    assert train == {"lr": 0.1, "attempt": 2, "resumed": True}  # failed once, the retry found the checkpoint
    # MLflow: one parent run for the execution; every stage process (run by DVC) is a nested run of it
    c = mlflow_client(root)
    runs = c.search_runs([c.get_experiment_by_name("cpt").experiment_id])
    parents = [r for r in runs if r.data.tags.get("cpt.flow") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    assert parents[0].data.tags["prefect.flow_run_name"]
    assert parents[0].info.run_name.startswith("baseline @ ")  # named for what changed: nothing, at this commit
    stages = sorted((r.info.run_name, r.info.status) for r in runs if r.data.tags.get("mlflow.parentRunId") == parent)
    assert stages == [("eval", "FINISHED"), ("ingest", "FINISHED"), ("train", "FAILED"), ("train", "FINISHED")]
    trains = {r.info.status: r.info.run_id for r in runs if r.info.run_name == "train"}
    assert [m.step for m in c.get_metric_history(trains["FAILED"], "loss/new")] == [5]
    assert [m.step for m in c.get_metric_history(trains["FINISHED"], "loss/new")] == [10]
    assert not c.get_metric_history(parent, "loss/new")  # curves stay in the train runs; the parent: the headline


def test_dvc_decides_what_reruns_and_set_params_writes_like_dvc_exp(toy):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import pipeline

    root, _ = toy
    state = pipeline(root=str(root), stages=["ingest", "train"], set_params=["train.lr=0.5"], track=False,
                     return_state=True)
    changed = state.result()
    # ingest is up to date (skipped, as `dvc repro` would), train depends on the changed param
    assert [(r["stage"], r["ran"]) for r in changed] == [("ingest", False), ("train", True)]
    # ...and the Prefect UI says so: the task's state is named Skipped or Ran (both COMPLETED)
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs()
        ours = {f.id for f in subflows if f.id == state.state_details.flow_run_id or f.parent_task_run_id and any(
            t.flow_run_id == state.state_details.flow_run_id for t in [client.read_task_run(f.parent_task_run_id)])}
        tasks = [t for t in client.read_task_runs() if t.flow_run_id in ours
                 and not t.state.state_details.child_flow_run_id]  # not the runs standing for subflow calls
        assert sorted((t.name.split("-")[0], t.state.name, t.state.type.value) for t in tasks
                      if t.name.split("-")[0] in ("ingest", "train")) == [
            ("ingest", "Skipped", "COMPLETED"), ("train", "Ran", "COMPLETED")]
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cpt-pipeline"])),
                                            limit=1, sort="CREATED_DESC")
        assert "| ingest | skipped (up to date) |" in artifact.data and "| train | ran |" in artifact.data
    assert changed[1]["metrics"]["lr"] == 0.5
    assert "lr: 0.5  # peak LR" in (root / "params.yaml").read_text()  # DVC's -S writer: comments kept


def test_dvc_experiment_is_its_own_mlflow_run_and_diffs(toy):
    """`dvc exp run -S` reruns what the change invalidated, and those stages land in MLflow under one parent run
    named after the experiment; `dvc exp show --json`, `dvc metrics diff` and `dvc plots diff` see it."""
    root, _ = toy
    env = base_env()
    dvc = [sys.executable, "-m", "dvc"]
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@x.invalid"]
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=root, check=True)
    lr = json.loads((root / "metrics" / "train.json").read_text())["lr"]
    run = subprocess.run([*dvc, "exp", "run", "-n", "lr7", "-S", "train.lr=0.7"], cwd=root, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Stage 'ingest' didn't change, skipping" in run.stdout
    shown = json.loads(subprocess.run([*dvc, "exp", "show", "--json"], cwd=root, env=env, capture_output=True,
                                      text=True, check=True).stdout)
    assert "lr7" in [r.get("name") for b in shown for e in (b.get("experiments") or []) for r in e.get("revs", [])]
    diff = json.loads(subprocess.run([*dvc, "metrics", "diff", "HEAD", "lr7", "--json"], cwd=root, env=env,
                                     capture_output=True, text=True, check=True).stdout)
    assert diff["metrics/train.json"]["lr"]["old"] == lr and diff["metrics/train.json"]["lr"]["new"] == 0.7
    plots = json.loads(subprocess.run([*dvc, "plots", "diff", "HEAD", "lr7", "--json"], cwd=root, env=env,
                                      capture_output=True, text=True, check=True).stdout)
    (loss,) = plots["data"]["loss"]  # the old/new loss curves of both revisions, in one plot
    assert loss["revisions"] == ["HEAD", "lr7"]
    rows = loss["content"]["data"]["values"]
    assert {r["rev"] for r in rows} == {"HEAD", "lr7"} and {r.get("field") for r in rows} >= {"loss_new", "loss_old"}
    c = mlflow_client(root)
    exp_id = c.get_experiment_by_name("cpt").experiment_id
    parents = c.search_runs([exp_id], filter_string="tags.`cpt.dvc_exp` = 'lr7'")
    parent = [r for r in parents if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.run_name == "lr7 (lr=0.7)"  # the experiment and what it changed
    assert parent[0].data.params["train.lr"] == "0.7"
    nested = c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert sorted(r.info.run_name for r in nested) == ["eval", "train"]  # ingest was up to date
    assert parent[0].info.status == "FINISHED"


def test_a_flow_that_did_not_evaluate_puts_no_gate_verdict_on_its_run(toy):
    """metrics/gate.json on disk is from an earlier eval: a data_prep run must not claim it."""
    from flows.pipeline import data_prep

    root, _ = toy
    (root / "metrics" / "gate.json").write_text(json.dumps({"promoted": True, "reason": "old news"}))
    data_prep(root=str(root), stages=["ingest"])
    c = mlflow_client(root)
    (run,) = c.search_runs([c.get_experiment_by_name("cpt").experiment_id], "tags.`cpt.flow` = 'data_prep'")
    assert run.info.status == "FINISHED" and not any(k.startswith("cpt.gate") for k in run.data.tags)


def test_a_stage_that_only_reexported_is_not_called_ran(tmp_path):
    """train (or sft) that found its finished checkpoint trained nothing: the task state and the artifact say
    "Re-exported", from the run's own timings (metrics/timings/<stage>.json)."""
    from flows import pipeline

    (tmp_path / "metrics" / "timings").mkdir(parents=True)
    (tmp_path / "metrics" / "timings" / "train.json").write_text(json.dumps({"retrained": False, "resumed_from": 80}))
    (tmp_path / "metrics" / "timings" / "sft.json").write_text(json.dumps({"train": {"retrained": True}}))
    assert pipeline._reexported(tmp_path, "train") and not pipeline._reexported(tmp_path, "sft")
    assert not pipeline._reexported(tmp_path, "eval")
    assert pipeline._state({"ran": True, "reexported": True}) == "re-exported (nothing trained)"
    assert pipeline._state({"ran": False}) == "skipped (up to date)" and pipeline._state({"ran": True}) == "ran"
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "metrics" / "summary.json").write_text(json.dumps({"gain": {"vi": 8.2}, "forgetting": {"en": 0.01},
                                                                    "decision": "refuse", "tokens_per_s": 3134.7}))
    text = pipeline._summary([{"stage": "train", "ran": True, "reexported": True, "seconds": 9.0}], tmp_path)
    assert "no throughput is quoted" in text and "tokens/s" not in text  # as the MLflow description says
