"""What DVC records and shows: the raw corpus files are ingest deps, no stage depends on a file with timings, a
fresh clone evaluates, one headline metric, plots that render offline, and the README's compare command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpt.ops import timings
from test_flows_support import base_env

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
KEEP = "Experiment|train.replay_ratio|gain\\.|forgetting\\.|passed"  # the README's --keep filter


def _paths(entries):
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def test_the_raw_source_files_are_ingest_dependencies():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    corpus = params["ingest"]["corpus_dir"]
    wanted = {f"{corpus}/{s['path']}" for s in params["ingest"]["sources"] if s.get("path")}
    deps = {d for d in DVC["stages"]["ingest"]["deps"] if d.startswith(corpus)}
    assert deps == wanted, "dvc.yaml's ingest deps must list exactly params.yaml's source files"


def test_no_stage_depends_on_a_file_with_timings():
    """Stage deps under metrics/ are results files, which run_stage writes without timing keys."""
    for name, stage in DVC["stages"].items():
        for dep in stage.get("deps", []):
            if dep.startswith("metrics/"):
                producer = [s for s, st in DVC["stages"].items() if dep in _paths(st.get("outs"))]
                assert producer, f"{name} depends on {dep}, which no stage writes"
    committed = {p.name: json.loads(p.read_text()) for p in (REPO / "metrics").glob("*.json")}
    for name, data in committed.items():  # the split removes every timing key these files have ever held
        results, _ = timings.split(data)
        flat = json.dumps(results)
        assert not re.search(r'"(seconds|\w+_seconds|tokens_per_s|\w+_per_s|mfu|timings)"', flat), name


def test_a_fresh_clone_evaluates_and_records_no_timings():
    eval_outs = DVC["stages"]["eval"]["outs"]
    cached = [o for o in eval_outs if isinstance(o, str) or next(iter(o.values())).get("cache", True)]
    ignored = subprocess.run(["git", "check-ignore", *[_paths([o])[0] for o in cached]], cwd=REPO,
                             capture_output=True, text=True).stdout.split()
    assert cached and len(ignored) == len(cached), "eval needs an output that is not in git (a fresh clone lacks it)"
    for path in ("metrics/timings/train.json", "dvc_plots/index.html", "reports/data_docs/index.html"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path
    assert "reports/data_docs" not in [o for s in DVC["stages"].values() for o in _paths(s.get("outs"))]


def test_plots_are_images_that_render_offline():
    assert "plots" not in DVC, "top-level vega plots load vega from a CDN"
    plots = [p for s in DVC["stages"].values() for p in _paths(s.get("plots"))]
    assert plots and all(p.endswith((".png", ".svg", ".jpg")) for p in plots), plots


COMPARE = f"dvc exp show --md --drop '.*' \\\n    --keep '{KEEP}'"  # the README's command, on two lines


def test_readme_compare_command_is_the_tested_one_and_every_command_fits_80_columns():
    for doc in (REPO / "README.md", REPO / "docs" / "experiments.md"):
        text = doc.read_text()
        assert COMPARE in text, doc
        block = text.split(COMPARE)[0].rsplit("```bash", 1)[1] + COMPARE + text.split(COMPARE)[1].split("```")[0]
        assert max(len(line) for line in block.splitlines()) <= 80, (doc, block)


@pytest.mark.slow
def test_compare_command_shows_exactly_the_answer_at_80_columns(tmp_path):
    """A DVC project with this repo's summary layout and two experiments: the README's `dvc exp show` filter shows
    replay_ratio, gain, forgetting and passed, nothing else, and drops none of them in an 80-column terminal."""
    (tmp_path / "params.yaml").write_text("seed: 1\ntrain:\n  replay_ratio: 0.25\n  lr: 0.002\n")
    (tmp_path / "gen.py").write_text(
        "import json, yaml\n"
        "from cpt.ops import summary\n"
        "r = yaml.safe_load(open('params.yaml'))['train']['replay_ratio']\n"
        "ev = {'gain': {'vi': 7.78 + r, 'zh': 13.15, 'ja': 15.08, 'ko': 13.89}, 'forgetting': {'en': 0.07 - r / 10},\n"
        "      'gain_ci95': {'vi': [7.6, 8.1]}, 'forgetting_ci95': {'en': [0.03, 0.06]}}\n"
        "s = summary.build(ev, {'passed': r > 0.2}, {'tokens_per_s': 2370.9})\n"
        "json.dump(s, open('summary.json', 'w'))\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  eval:\n    cmd: python gen.py\n    deps: [gen.py]\n"
                                       "    params: [train]\n    metrics: [{summary.json: {cache: false}}]\n")
    env = base_env(COLUMNS="80", PYTHONPATH=str(REPO / "src"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@x.invalid"]
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "repro", "-q"], ["git", "add", "-A"],
                [*git, "commit", "-qm", "baseline"],
                [*dvc, "exp", "run", "-q", "-n", "replay10", "-S", "train.replay_ratio=0.1"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    out = subprocess.run([*dvc, "exp", "show", "--no-pager", "--md", "--drop", ".*", "--keep", KEEP], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=True).stdout
    lines = [ln.rstrip() for ln in out.splitlines() if ln.strip()]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(header) == {"Experiment", "gain.ja", "gain.ko", "gain.vi", "gain.zh", "forgetting.en", "passed",
                           "train.replay_ratio"}, header
    assert "replay10" in out and "False" in out and "True" in out
