"""What a person sees (slow): the MLflow experiment page, loaded in headless Chromium from an `mlflow server` on
loopback, names the pipeline runs as docs/experiments.md says (`baseline @ <sha>`, `<exp> (<what changed>)`).

The runs are made by cpt's own tracking (a stage nested under a grouped parent, the headline after eval), in a small
git project; the page is the one the README tells users to open (``?workflowType=machine_learning``: MLflow 3 opens
an experiment on its GenAI traces view otherwise). Skips where Debian's `chromium` is not installed (.ci/run
installs it).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest

from cpt.layout import Layout
from cpt.ops import gate, headline, tracking
from test_flows_support import mlflow_db, mlflow_server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVAL = {"base": {"vi_x": {"bpb": 10.0, "bytes": 100}, "en_x": {"bpb": 3.0, "bytes": 100}},
        "cpt": {"vi_x": {"bpb": 2.2, "bytes": 100}, "en_x": {"bpb": 3.045, "bytes": 100}},
        "gain": {"vi": 7.8}, "forgetting": {"en": 0.045}}


def page_text(url: str, tmp_path, budget_ms: int = 25000, size: str = "1280,800") -> str:
    """The rendered DOM of ``url`` as text (scripts and styles dropped); ``size``: the window (the runs table renders
    only the columns that fit)."""
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={tmp_path / 'chrome'}", f"--virtual-time-budget={budget_ms}",
                          f"--window-size={size}", "--dump-dom", url], capture_output=True, text=True, timeout=180)
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", "", out.stdout, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_experiment_page_names_the_runs_as_the_docs_say(tmp_path, monkeypatch):
    for var in (tracking.ENV_PARENT, "MLFLOW_TRACKING_URI", tracking.ENV_SWITCH, "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    store = tmp_path / "store"
    mlflow_db(store)
    params = {"seed": 1, "train": {"replay_ratio": 0.25},
              "ingest": {"sources": [{"name": "vi_x", "lang": "vi", "domain": "new"},
                                     {"name": "en_x", "lang": "en", "domain": "old"}]},
              "tracking": {"uri": f"sqlite:///{store / 'mlflow.db'}", "artifact_root": str(store / "art"),
                           "flush_interval": 0.2, "close_timeout": 5, "system_metrics": []}}
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "params.yaml").write_text(json.dumps(params))
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@x.invalid", "commit", "-qm", "p"]):
        subprocess.run(cmd, cwd=proj, check=True, capture_output=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=proj, capture_output=True, text=True).stdout[:7]
    layout = Layout(proj)
    (proj / "metrics").mkdir()
    layout.model.mkdir(parents=True)
    (layout.model / "config.json").write_text('{"model_type": "llama"}')
    (proj / "metrics" / "eval.json").write_text(json.dumps(EVAL))

    def pipeline(run_params, exp=None):
        if exp:
            monkeypatch.setenv("DVC_EXP_NAME", exp)
            monkeypatch.setenv("DVC_EXP_BASELINE_REV", sha)
        tr = tracking.for_stage("eval", run_params, layout)
        headline.publish(layout, tr, gate.run(run_params, layout, EVAL, tr))
        tr.close("FINISHED", EVAL)
        monkeypatch.delenv("DVC_EXP_NAME", raising=False)

    pipeline(params)  # plain `dvc repro` of the commit
    pipeline({**params, "train": {"replay_ratio": 0.1}}, exp="replay10")  # `dvc exp run -n replay10 -S ...`
    with mlflow_server(store) as url:
        from mlflow import MlflowClient

        exp_id = MlflowClient(tracking_uri=url).get_experiment_by_name("cpt").experiment_id
        text = page_text(f"{url}/#/experiments/{exp_id}?workflowType=machine_learning", tmp_path)
        # the saved view the docs link: the runs table with the headline columns (none without it)
        table = page_text(f"{url}/#/experiments/{exp_id}/runs?viewStateShareKey=cpt-headline"
                          "&workflowType=machine_learning", tmp_path, size="3000,900")
    assert f"baseline @ {sha}" in text, text[:2000]
    assert "replay10 (replay_ratio=0.1)" in text or "replay10 (replay_rati" in text, text[:2000]
    assert "summary/forgetting/en" not in text  # MLflow 3.17 opens its table with no metric column...
    for column in ("summary/forgetting/en", "summary/gain/vi", "train.replay_ratio", "cpt.gate.decision"):
        assert column in table, table[:3000]  # ...the saved view shows the headline
