"""DVC experiments in temporary and queued workspaces (`dvc exp run --temp`, `--queue` + `dvc queue start`): DVC runs
them in a git copy under .dvc/tmp/exps/, where a corpus path relative to the project points nowhere. The corpora are
the DVC remote `corpora` (cpt.dvc_paths): dvc.yaml's deps and params both say remote://corpora/..., and the local
DVC config that locates it is copied into the workspace by DVC itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpt import dvc_paths
from cpt.errors import ConfigError
from cpt.layout import Layout
from test_flows_support import base_env, mlflow_db, project_copy, tiny_params_text

DVC = [sys.executable, "-m", "dvc"]


def test_remote_paths_resolve_through_the_local_config_first(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / ".dvc").mkdir(parents=True)
    (proj / "demos" / "smollm2").mkdir(parents=True)
    (proj / ".dvc" / "config").write_text("[core]\n    remote = local\n['remote \"local\"']\n    url = /elsewhere\n"
                                          "['remote \"corpora\"']\n    url = ../../shared/corpora\n")
    assert Layout(proj).resolve("remote://corpora/xcopa") == tmp_path / "shared" / "corpora" / "xcopa"
    # a pipeline in a subfolder finds the same remote (the .dvc folder above it)
    assert Layout(proj / "demos" / "smollm2").resolve("remote://corpora") == tmp_path / "shared" / "corpora"
    (proj / ".dvc" / "config.local").write_text("['remote \"corpora\"']\n    url = /data/corpora\n")
    assert Layout(proj).resolve("remote://corpora") == Path("/data/corpora")
    # the spelling DVC writes into an experiment's copy (ConfigObj of the parsed dict)
    (proj / ".dvc" / "config.local").write_text("[remote]\n    [[local]]\n        url = /x\n    [[corpora]]\n"
                                              "        url = /mnt/corpora\n[core]\n    remote = local\n")
    assert Layout(proj).resolve("remote://corpora/a") == Path("/mnt/corpora/a")
    with pytest.raises(ConfigError, match="dvc remote add --local nope"):
        Layout(proj).resolve("remote://nope/x")
    # an experiment's temporary copy keeps its MLflow store in the project DVC was started in (DVC_ROOT)
    copy = proj / ".dvc" / "tmp" / "exps" / "tmpab12" / "demos" / "smollm2"
    (copy.parents[1] / ".dvc").mkdir(parents=True)
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(proj))
    assert dvc_paths.origin_root(copy) == proj / "demos" / "smollm2"
    assert dvc_paths.origin_root(proj) == proj
    monkeypatch.delenv("DVC_ROOT")
    assert dvc_paths.origin_root(copy) == copy


@pytest.mark.slow
def test_a_temp_experiment_runs_end_to_end_and_tracks_into_the_project(tmp_path, corpora):
    """`dvc exp run --temp` of the real dvc.yaml on tiny params: every stage finds its corpora (ingest's sources,
    eval's XCOPA, sft's instructions), the experiment's metrics come back to the project, and its MLflow runs land
    in the project's store (not in the deleted copy), under one parent named after the experiment."""
    params = yaml.safe_load(tiny_params_text(corpora))
    params["ingest"]["corpus_dir"] = "remote://corpora"  # as the repo's params.yaml says
    proj = project_copy(tmp_path / "proj", yaml.safe_dump(params, sort_keys=False, allow_unicode=True), corpora)
    mlflow_db(proj)
    env = base_env()
    for var in ("CPT_MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "CPT_TRACKING", "DVC_EXP_NAME", "DVC_ROOT"):
        env.pop(var, None)
    out = subprocess.run([*DVC, "exp", "run", "--temp", "-n", "tiny6", "-S", "train.steps=6"], cwd=proj, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "Errno 2" not in out.stdout + out.stderr
    assert not list((proj / ".dvc" / "tmp" / "exps").glob("tmp*")), "the temporary copy is cleaned up"
    show = json.loads(subprocess.run([*DVC, "exp", "show", "--json"], cwd=proj, env=env, capture_output=True,
                                     text=True, check=True).stdout)
    exps = [e for rev in show for e in (rev.get("experiments") or []) if e.get("name") == "tiny6"]
    assert exps, show
    data = exps[0]["revs"][0]["data"]
    summary = data["metrics"]["metrics/summary.json"]["data"]
    assert summary["decision"] in ("promote", "refuse", "undecided") and summary["gain"]["vi"] > 0
    assert data["params"]["params.yaml"]["data"]["train"]["steps"] == 6
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cpt").experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("cpt.dvc_exp") == "tiny6" and "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "tiny6 (steps=6)", [r.info.run_name for r in runs]
    stages = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert stages >= {"ingest", "eval", "sft"}, stages
    assert "mlflow.note.content" in parents[0].data.tags  # the headline reached the parent
    assert not os.path.exists(proj / "data"), "nothing ran in the workspace itself"
