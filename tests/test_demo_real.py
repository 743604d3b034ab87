"""The second demo (demos/smollm2, docs/demo-real.md) stays the same pipeline as the root one: the same stages,
`cpt <stage>` commands, params sections and outputs, code deps pointing at ../../src, ingest deps equal to its own
sources, every section valid for its stage, and the one command in the Makefile and README."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demos" / "smollm2"
ROOT_DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
DEMO_DVC = yaml.safe_load((DEMO / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((DEMO / "params.yaml").read_text())


def _paths(entries):
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def test_the_second_dvc_yaml_is_generated_from_the_root_one():
    spec = importlib.util.spec_from_file_location("demo_real_dvc", REPO / "scripts" / "demo_real_dvc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check", "--root", str(REPO)]) == 0, "run: python scripts/demo_real_dvc.py"


def test_same_stages_commands_params_and_outputs_as_the_root_pipeline():
    assert list(DEMO_DVC["stages"]) == list(ROOT_DVC["stages"])
    for name, root in ROOT_DVC["stages"].items():
        demo = DEMO_DVC["stages"][name]
        assert demo["cmd"] == root["cmd"] == f"cpt {name}"
        assert demo.get("params") == root.get("params"), name
        assert demo.get("outs") == root.get("outs") and demo.get("metrics") == root.get("metrics"), name
        code = [d for d in root["deps"] if d.startswith("src/")]
        assert [d for d in demo["deps"] if d.startswith("../../src/")] == [f"../../{d}" for d in code], name
        local = [d for d in root["deps"] if not d.startswith(("src/", "remote://"))]
        assert [d for d in demo["deps"] if not d.startswith(("../../", "remote://"))] == local, name


def test_ingest_deps_are_its_own_sources_and_the_base_is_the_gguf():
    corpus = PARAMS["ingest"]["corpus_dir"]
    wanted = {f"{corpus}/{s['path']}" for s in PARAMS["ingest"]["sources"]}
    assert {d for d in DEMO_DVC["stages"]["ingest"]["deps"] if d.startswith(corpus)} == wanted
    assert {s["lang"] for s in PARAMS["ingest"]["sources"]} == {"en", "vi"}
    model = PARAMS["base"]["model"]
    assert model.startswith("remote://models/") and model.endswith(".gguf")
    assert model in DEMO_DVC["stages"]["base"]["deps"]
    assert "downstream" in DEMO_DVC["stages"] and "merge" in DEMO_DVC["stages"]


def test_every_section_is_valid_for_its_stage_and_runs_are_told_apart():
    for stage in ("base", "tokenizer", "shards", "train", "eval", "downstream", "merge", "sft"):
        module = importlib.import_module(f"cpt.stages.{stage}")
        if hasattr(module, "config"):
            module.config(PARAMS)
    root = yaml.safe_load((REPO / "params.yaml").read_text())
    assert PARAMS["tracking"]["experiment"] != root["tracking"]["experiment"]
    assert PARAMS["tracking"]["model_name"] != root["tracking"]["model_name"]
    assert PARAMS["sft"]["model_name"] != root["sft"]["model_name"]
    assert PARAMS["tokenizer"]["languages"] == ["vi"]


def test_one_command_in_the_makefile_and_the_readme():
    make = (REPO / "Makefile").read_text()
    assert "demo-real:" in make and "dvc repro demos/smollm2/dvc.yaml" in make and "smollm2:" in make
    assert "make demo-real" in (REPO / "README.md").read_text()
    assert (REPO / "docs" / "demo-real.md").exists()
