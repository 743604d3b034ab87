import json
import subprocess
import sys

import pytest

from cpt.cli import build_parser, main
from cpt.params import ParamsError, apply_overrides, flatten, load_params
from cpt.stages import STAGES


def test_stages_in_pipeline_order():
    assert STAGES == ("ingest", "clean", "validate", "base", "tokenizer", "shards", "train", "eval", "sft")


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
        metrics = [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]
        assert f"metrics/{name}.json" in metrics


def test_unknown_param_keys_are_refused_not_ignored():
    from cpt.errors import ConfigError
    from cpt.params import with_defaults

    assert with_defaults("train", {"lr": 2}, {"lr": 1, "steps": 3}) == {"lr": 2, "steps": 3}
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) \['replay_ration'\]"):
        with_defaults("train", {"replay_ration": 0.1}, {"replay_ratio": 0.25})
