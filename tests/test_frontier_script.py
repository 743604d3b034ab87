"""scripts/frontier.py: `dvc exp show --json` sweeps and the merge points on one gain-vs-forgetting figure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("frontier_script", REPO / "scripts" / "frontier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _summary(f: float, g: float) -> dict:
    return {"metrics/summary.json": {"data": {
        "gain": {"vi": g, "zh": g + 5}, "gain_ci95": {"vi": [g - 0.2, g + 0.2], "zh": [g + 4.8, g + 5.2]},
        "forgetting": {"en": f}, "forgetting_ci95": {"en": [f - 0.01, f + 0.01]}, "decision": "refuse"}}}


def _state(rev: str, name: str | None, replay: float, lr: float, f: float, g: float, **extra) -> dict:
    return {"rev": rev, "name": name, "error": None, **extra, "data": {
        "rev": rev, "timestamp": None, "metrics": _summary(f, g),
        "params": {"params.yaml": {"data": {"train": {"replay_ratio": replay, "lr": lr},
                                            "gate": {"max_forgetting": 0.05, "min_gain": 0.02}}}}}}


SHOW = [
    _state("workspace", None, 0.25, 2e-3, 0.014, 8.2),
    _state("a" * 40, "main", 0.25, 2e-3, 0.014, 8.2, experiments=[
        {"name": "replay50", "executor": None, "revs": [_state("b" * 40, "replay50", 0.5, 2e-3, 0.006, 7.1)]},
        {"name": "lr1e3", "executor": None, "revs": [_state("c" * 40, "lr1e3", 0.25, 1e-3, 0.009, 7.6)]},
        {"name": "queued", "executor": None, "revs": [{"rev": "d" * 40, "name": "queued", "data": None,
                                                       "error": None}]},
    ]),
]


def _eval_json(heldout_en: float) -> dict:
    return {"sources": {"heldout_en": {"domain": "old", "forgetting": heldout_en,
                                       "forgetting_ci95": [heldout_en - 0.005, heldout_en + 0.005]},
                        "ntrex_vi": {"domain": "new", "gain": 7.9, "gain_ci95": [7.5, 8.3]}},
            "gain": {"vi": 8.2}, "gain_ci95": {"vi": [8.0, 8.4]}, "forgetting": {"en": 0.014},
            "forgetting_ci95": {"en": [0.008, 0.02]}}


def _merge_json() -> dict:
    def pt(a):
        return {"alpha": a, "binding": {"forgetting": {"name": "source heldout_en", "value": 0.08 * a,
                                                       "ci95": [0.08 * a - 0.005, 0.08 * a + 0.005]},
                                        "gain": {"name": "source ntrex_vi", "value": 7.9 * a,
                                                 "ci95": [7.9 * a - 0.4, 7.9 * a + 0.4]}}}
    return {"points": [pt(a) for a in (0.0, 0.25, 0.5, 0.75, 1.0)], "chosen": 0.5, "max_forgetting": 0.05,
            "min_gain": 0.02}


def test_frontier_over_a_synthetic_exp_show(tmp_path):
    mod = _script()
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(_eval_json(0.082)))
    (tmp_path / "metrics" / "merge.json").write_text(json.dumps(_merge_json()))
    show = tmp_path / "show.json"
    show.write_text(json.dumps(SHOW))
    out = tmp_path / "f.png"
    assert mod.main(["--root", str(tmp_path), "--exp-json", str(show), "--out", str(out), "--no-mlflow"]) == 0
    from PIL import Image

    assert Image.open(out).size == (720, 480)
    data = json.loads(out.with_suffix(".json").read_text())
    by_name = {e["name"]: e for e in data["experiments"]}
    assert set(by_name) == {"workspace", "main", "replay50", "lr1e3"}  # the queued one has no metrics yet
    # the workspace reads its eval.json: the binding forgetting is the held-out source, not the pooled language
    ws = by_name["workspace"]["binding"]
    assert ws["forgetting"]["name"] == "source heldout_en" and ws["forgetting"]["value"] == 0.082
    assert ws["gain"]["name"] == "source ntrex_vi"
    # no git here: the experiments fall back to summary.json's per-language numbers and say so
    r50 = by_name["replay50"]
    assert r50["label"] == "replay50 (replay 0.5, lr 0.002) (per language)" and r50["replay_ratio"] == 0.5
    assert r50["binding"]["forgetting"] == {"name": "lang en", "value": 0.006, "ci95": [-0.004, 0.016]}
    assert r50["binding"]["gain"]["name"] == "lang vi"  # the lowest lower bound of vi and zh
    assert by_name["lr1e3"]["lr"] == 1e-3
    assert data["max_forgetting"] == 0.05 and [p["alpha"] for p in data["merge_points"]] == [0, 0.25, 0.5, 0.75, 1]


@pytest.mark.slow  # a fresh sqlite MLflow store: ~10 s idle, ~45 s on a busy 2-core box
def test_frontier_is_logged_to_the_mlflow_experiment(tmp_path):
    mod = _script()
    (tmp_path / "params.yaml").write_text("tracking:\n  uri: sqlite:///mlflow.db\n  artifact_root: mlartifacts\n"
                                          "  experiment: cptx\n")
    show = tmp_path / "show.json"
    show.write_text(json.dumps(SHOW))
    assert mod.main(["--root", str(tmp_path), "--exp-json", str(show)]) == 0
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cptx").experiment_id])
    assert [r.info.run_name for r in runs] == ["frontier"]
    files = {f.path for f in client.list_artifacts(runs[0].info.run_id, "frontier")}
    assert files == {"frontier/frontier_experiments.png", "frontier/frontier_experiments.json"}
