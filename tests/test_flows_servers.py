"""End to end on real servers (slow): a ``prefect server`` and an ``mlflow server`` on loopback, the deployments of
prefect.yaml, a process worker (``--run-once``) running the ``pipeline/nightly`` deployment over a temporary copy of
this project with tests/params_tiny.yaml. (``dvc exp run`` -> MLflow is checked on the small DVC project of
test_flows.py: same mechanism, a fraction of the time.)

Checked through the servers' own clients: the flow run completed with one task per stage; the stage outputs exist;
MLflow has one parent run with a nested run per stage, the per-step metric history, the registered model version
and its ``champion`` alias (downloadable as an HF folder); a stage started while the tracking server was down
delivered everything once it came up.
Every process is started in its own process group and stopped by pid in a finally.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from cpt.stages import STAGES
from test_flows_support import (BIN, base_env, free_port, mlflow_db, mlflow_server_cmd, project_copy, spawn, stop,
                                tiny_params_text, wait_http)

pytestmark = pytest.mark.slow

SETUP = """
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
from prefect.workers.process import ProcessWorker

template = ProcessWorker.get_default_base_job_template()
with get_client(sync_client=True) as c:
    for pool in ("gpu", "cpu"):
        c.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
    c.create_work_queue(name="gpu-0", work_pool_name="gpu", concurrency_limit=1)  # one run per GPU
    c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu-0", limit=1))  # the train/eval slot
"""

TRIGGER = """
import sys
from prefect.deployments import run_deployment

run = run_deployment("pipeline/nightly", timeout=0,
                     parameters={"pull": False, "push": False, "retry_delay": 0})
print(run.id)
"""

INSPECT = """
import json, sys
from prefect.client.orchestration import get_client

with get_client(sync_client=True) as c:
    flow_runs = c.read_flow_runs()
    nightly = c.read_deployment_by_name("pipeline/nightly")
    task_runs = c.read_task_runs()
    print(json.dumps({
        "flow_runs": {str(r.id): {"flow": c.read_flow(r.flow_id).name, "state": r.state_type.value,
                                  "parent_task": str(r.parent_task_run_id)} for r in flow_runs},
        "task_runs": [{"name": t.name, "state": t.state_type.value, "state_name": t.state_name,
                       "flow_run": str(t.flow_run_id)} for t in task_runs],
        "pull_steps": nightly.pull_steps,
        "nightly": {"crons": [s.schedule.cron for s in nightly.schedules], "pool": nightly.work_pool_name,
                    "queue": nightly.work_queue_name, "env": nightly.job_variables.get("env"),
                    "limit": nightly.global_concurrency_limit.limit if nightly.global_concurrency_limit else None},
    }))
"""


def _run(cmd, env, cwd=None, timeout=300):
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd[:4]} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory, corpora):
    tmp = tmp_path_factory.mktemp("stack")
    proj = project_copy(tmp / "proj", tiny_params_text(corpora), corpora)
    mlflow_db(tmp / "mlflow")
    mport, pport = free_port(), free_port()
    env = base_env(PREFECT_HOME=str(tmp / "prefect_home"), PREFECT_API_URL=f"http://127.0.0.1:{pport}/api",
                   PREFECT_UI_ENABLED="false", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mport}",
                   PREFECT_LOGGING_LEVEL="INFO")
    env.pop("CPT_MLFLOW_RUN_ID", None)
    env.pop("CPT_ROOT", None)  # a worker started with no extra variable: the deployment carries its folder
    env.pop("CPT_TRACKING", None)
    # a stage that starts while the tracking server is down (checked in test_a_server_started_mid_stage_...)
    from cpt.ops import tracking
    from cpt.layout import Layout

    early = tracking.for_stage("train", {"tracking": {"uri": f"http://127.0.0.1:{mport}", "flush_interval": 0.5,
                                                      "close_timeout": 120, "experiment": "mid-run"}},
                               Layout(tmp / "early"))
    for step in range(10):
        early.log_metrics({"loss/new": float(step)}, step=step)
    time.sleep(1.0)
    early_before = early.run_id  # None: nothing listening yet
    procs = []
    try:
        procs.append(mls := spawn(mlflow_server_cmd(mport, tmp / "mlflow"), tmp / "mlflow.log", base_env()))
        procs.append(ps := spawn([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(pport)],
                                 tmp / "prefect_server.log", env))
        wait_http(f"http://127.0.0.1:{pport}/api/health", ps, tmp / "prefect_server.log", timeout=180)
        _run([sys.executable, "-c", SETUP], env)
        _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env, cwd=proj)
        flow_run_id = _run([sys.executable, "-c", TRIGGER], env).strip().splitlines()[-1]
        wait_http(f"http://127.0.0.1:{mport}/health", mls, tmp / "mlflow.log", timeout=180)
        for step in range(10, 20):
            early.log_metrics({"loss/new": float(step)}, step=step)
        early.close("FINISHED", {"loss": 0.5})
        started = time.monotonic()
        worker = spawn([str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--work-queue", "gpu-0",
                        "--type", "process", "--run-once", "--limit", "1"], tmp / "worker.log", env,
                       cwd=tmp)  # anywhere but the project
        procs.append(worker)
        try:
            worker.wait(timeout=900)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker still running after 900 s:\n{(tmp / 'worker.log').read_text()[-4000:]}")
        seconds = time.monotonic() - started
        state = json.loads(_run([sys.executable, "-c", INSPECT], env))
        yield {"proj": proj, "env": env, "tmp": tmp, "flow_run_id": flow_run_id, "state": state,
               "mlflow": f"http://127.0.0.1:{mport}", "seconds": seconds, "early": early, "early_before": early_before}
    finally:
        for proc in reversed(procs):
            stop(proc)


def _client(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack["mlflow"])


def test_deployment_run_completes_with_a_task_per_stage_and_its_artifacts(stack):
    state, fid = stack["state"], stack["flow_run_id"]
    log = (stack["tmp"] / "worker.log").read_text(errors="replace")[-4000:]
    assert state["flow_runs"][fid]["state"] == "COMPLETED", log
    assert state["flow_runs"][fid]["flow"] == "pipeline"
    # every stage is a task of the pipeline's own flow run: its page lists how each one ended (no subflows)
    assert not [r["flow"] for r in state["flow_runs"].values() if r["parent_task"] != "None"]
    assert {t["name"] for t in state["task_runs"] if t["flow_run"] == fid} >= set(STAGES)
    # the deployment as prefect.yaml declares it: nightly cron, gpu pool, queue gpu-0, GPU by job variable, limit 1
    assert state["nightly"]["crons"] == ["0 2 * * *"]
    assert (state["nightly"]["pool"], state["nightly"]["queue"]) == ("gpu", "gpu-0")
    assert state["nightly"]["env"]["CUDA_VISIBLE_DEVICES"] == "0" and state["nightly"]["limit"] == 1
    stage_tasks = [t for t in state["task_runs"] if t["name"] in STAGES]
    assert sorted(t["name"] for t in stage_tasks) == sorted(STAGES)
    assert all(t["state"] == "COMPLETED" and t["state_name"] == "Ran" for t in stage_tasks)  # Ran, not Skipped
    proj = stack["proj"]
    # the deployment carries its working directory (the worker ran in tmp/, with no CPT_ROOT)
    (step,) = state["pull_steps"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(proj)
    for stage in STAGES:
        assert (proj / "metrics" / f"{stage}.json").exists(), stage
    assert (proj / "data" / "models" / "cpt" / "config.json").exists()
    assert (proj / "reports" / "eval" / "report.md").exists()
    lock = (proj / "dvc.lock").read_text()
    assert all(f"  {stage}:" in lock for stage in STAGES)  # DVC recorded every stage: `dvc repro` agrees
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=proj, env=stack["env"],
                            capture_output=True, text=True)
    assert json.loads(status.stdout or "{}") == {}, status.stdout


def test_mlflow_server_has_the_run_the_history_and_the_champion(stack, monkeypatch):
    c = _client(stack)
    exp = c.get_experiment_by_name("cpt")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("prefect.flow_run_id") == stack["flow_run_id"]]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name.startswith("baseline @ ") and parent.info.status == "FINISHED"
    assert parent.data.tags["cpt.flow"] == "pipeline" and parent.data.tags["cpt.dvc_exp"] == "baseline"
    assert "train.replay_ratio" in parent.data.params and parent.data.tags["mlflow.source.git.commit"]
    nested = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(nested) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in nested.values())
    steps = params_steps(stack)
    history = c.get_metric_history(nested["train"].info.run_id, "loss/new")
    assert [m.step for m in history] == list(range(1, steps + 1))
    assert not c.get_metric_history(parent.info.run_id, "loss/new")  # the parent holds the headline, not curves
    assert "summary/gain/vi" in parent.data.metrics and "tokenizer/seconds" not in parent.data.metrics
    assert "bpb forgotten, gate passed**" in parent.data.tags["mlflow.note.content"]  # it states the result
    arts = {a.path for a in c.list_artifacts(nested["tokenizer"].info.run_id, "reports")}
    assert "reports/fertility.md" in arts
    # registry: the gate passed on this run, registered the model and moved the alias
    gate = json.loads((stack["proj"] / "metrics" / "gate.json").read_text())
    assert gate["promoted"], gate["reason"]
    champion = c.get_model_version_by_alias("cpt", "champion")
    assert str(champion.version) == gate["version"]
    assert champion.run_id == nested["eval"].info.run_id
    import mlflow.artifacts

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["mlflow"])  # models:/ resolves through the registry URI
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", stack["mlflow"])
    local = mlflow.artifacts.download_artifacts("models:/cpt@champion", dst_path=str(stack["tmp"] / "champion"))
    assert (stack["tmp"] / "champion" / "config.json").exists(), local  # an HF folder, loadable as is
    assert parent.data.tags["cpt.gate.promoted"] == "True"
    # the version says the decision first (the registry's list cuts descriptions short), then budgets and numbers
    assert champion.description.startswith("promote (alias champion): every source and language within budget")
    assert "budgets: min_gain 0, max_forgetting 1, min_documents 2 | gain: vi +" in champion.description
    assert champion.tags["cpt.gate.decision"] == "promote" and champion.tags["cpt.gate.max_forgetting"] == "1"
    (sft,) = c.search_model_versions("name='cpt-sft'")  # the sft model's versions are described the same way
    assert sft.description.split(":")[0] in ("promote (alias champion)", "refuse", "undecided"), sft.description


def params_steps(stack) -> int:
    import yaml

    return int(yaml.safe_load((stack["proj"] / "params.yaml").read_text())["train"]["steps"])


def test_a_server_started_mid_stage_receives_everything(stack):
    """The stage began while nothing listened on the tracking port, logged, and closed after the server came up:
    one run, every step in order, marked as having arrived late, nothing left in the spool."""
    early = stack["early"]
    assert stack["early_before"] is None and early.run_id
    c = _client(stack)
    run = c.get_run(early.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 0.5
    assert [m.step for m in c.get_metric_history(early.run_id, "loss/new")] == list(range(20))
    assert "send failures" in run.data.tags["cpt.tracking.late"]
    assert not list((stack["tmp"] / "early" / "data").glob("tracking_spool/*.jsonl"))
