import json
import subprocess
import sys

import pytest

from cpt.cli import build_parser, main
from cpt.params import ParamsError, apply_overrides, flatten, load_params
from cpt.stages import STAGES


def test_stages_in_pipeline_order():
    assert STAGES == ("ingest", "clean", "validate", "base", "tokenizer", "shards", "train", "eval", "downstream", "merge", "sft")


def test_help_lists_every_stage_in_order(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    positions = [out.index(f"  {s} ") for s in STAGES]
    assert positions == sorted(positions)


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "cpt.cli", "--help"], capture_output=True, text=True, check=True)
    assert "tokenizer" in out.stdout


def test_overrides_parse_yaml_values():
    params = {"train": {"lr": 1e-3, "steps": 10}, "seed": 1}
    out = apply_overrides(params, ["train.lr=3e-4", "train.compile=true", "new.section.key=[1, 2]", "seed=7"])
    assert out["train"] == {"lr": 3e-4, "steps": 10, "compile": True}
    assert out["new"]["section"]["key"] == [1, 2]
    assert out["seed"] == 7
    assert params["train"]["lr"] == 1e-3  # input untouched


@pytest.mark.parametrize("bad", ["train.lr", "=3", "seed.x=1"])
def test_bad_overrides_are_errors(bad):
    with pytest.raises(ParamsError):
        apply_overrides({"seed": 1}, [bad])


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": 2}) == {"a.b": 1, "a.c.d": [1], "e": 2}


def test_repo_params_load(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert "ingest" in params and params["ingest"]["sources"]


def test_missing_params_file_is_a_clear_error(tmp_path, capsys):
    rc = main(["ingest", "-p", str(tmp_path / "nope.yaml"), "--root", str(tmp_path)])
    assert rc == 1
    assert "nope.yaml" in capsys.readouterr().err


def test_dvc_stages_match_cli_verbs(repo_root):
    import yaml

    dvc = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == list(STAGES)
    for name, stage in dvc["stages"].items():
        assert stage["cmd"].split()[:2] == ["cpt", name]
        outs = [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("outs", [])]
        assert f"metrics/{name}.json" in outs  # results in git, a plain output (not a DVC metric)
        for out in stage.get("outs", []):
            if isinstance(out, dict) and next(iter(out)).startswith("metrics/"):
                assert next(iter(out.values())).get("cache") is False, out
    declared = [next(iter(m)) if isinstance(m, dict) else m for s in dvc["stages"].values() for m in s.get("metrics", [])]
    assert declared == ["metrics/summary.json"], "the headline is the one DVC metric (dvc metrics show stays narrow)"


def test_unknown_param_keys_are_refused_not_ignored():
    from cpt.errors import ConfigError
    from cpt.params import with_defaults

    assert with_defaults("train", {"lr": 2}, {"lr": 1, "steps": 3}) == {"lr": 2, "steps": 3}
    with pytest.raises(ConfigError) as err:
        with_defaults("train", {"replay_ration": 0.1}, {"replay_ratio": 0.25, **{f"k{i}": i for i in range(30)}})
    msg = str(err.value)
    assert "unknown key 'replay_ration' (did you mean 'replay_ratio'?)" in msg
    assert len(msg) < 200 and "\n" not in msg and "k17" not in msg  # one short line, not 31 keys


def test_yaml_error_is_one_line_with_file_line_column(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: 1\ntrain:\n  lr: [1, 2\n  steps: 3\n")
    assert main(["train", "-p", str(bad), "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "<unicode string>" not in err
    assert f"{bad}:4:8: not valid YAML" in err, err


def test_params_error_creates_no_mlflow_run(tmp_path, monkeypatch, capsys):
    """A typo in a param fails before the stage's MLflow run (and its parent) exist: nothing FAILED is left behind."""
    from mlflow import MlflowClient

    from cpt.ops import tracking

    for var in (tracking.ENV_PARENT, "MLFLOW_TRACKING_URI", tracking.ENV_SWITCH, "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = tmp_path / "params.yaml"
    params.write_text(f"seed: 1\ntrain: {{replay_ration: 0.1}}\ntracking: {{uri: '{uri}', close_timeout: 1}}\n")
    assert main(["train", "-p", str(params), "--root", str(tmp_path)]) == 1
    assert "did you mean 'replay_ratio'?" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=uri)
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps]) if exps else []
    assert runs == []
