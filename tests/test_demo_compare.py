"""`make demo` ends by comparing its fresh results with the committed ones (scripts/demo_compare.py): each number
against the committed 95% interval, each gate decision against the committed one."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("demo_compare", REPO / "scripts" / "demo_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(root: Path, forgetting: float, decision: str) -> None:
    (root / "metrics").mkdir(exist_ok=True)
    ev = {"gain": {"vi": 8.16}, "gain_ci95": {"vi": [7.91, 8.40]}, "forgetting": {"en": forgetting},
          "forgetting_ci95": {"en": [forgetting - 0.007, forgetting + 0.007]}}
    gate = {"decision": decision, "per_source": {"heldout_en": {"metric": "forgetting", "value": forgetting + 0.07,
                                                                "ci95": [forgetting + 0.065, forgetting + 0.075]}}}
    sft = {"gain": {"vi": 0.18}, "gain_ci95": {"vi": [0.15, 0.21]}, "gate": {"decision": "undecided"}}
    for name, data in (("eval", ev), ("gate", gate), ("sft", sft)):
        (root / "metrics" / f"{name}.json").write_text(json.dumps(data))


def test_fresh_numbers_are_read_against_the_committed_intervals_and_decisions(tmp_path, capsys):
    mod = _script()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@x.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    _write(tmp_path, 0.014, "refuse")
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "demo"], cwd=tmp_path, check=True)
    assert mod.main(["--root", str(tmp_path)]) == 0
    assert "reproduced the results committed at HEAD exactly" in capsys.readouterr().out
    ev = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({**ev, "bootstrap": {"unit": "document"}}))
    assert mod.main(["--root", str(tmp_path)]) == 0  # a new field, the same numbers
    assert "reproduced every number and decision committed at HEAD (4 numbers, 2 decisions" in capsys.readouterr().out
    _write(tmp_path, 0.024, "undecided")  # another CPU: English forgetting moved outside its committed interval
    assert mod.main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| forgetting en | +0.014 [+0.007, +0.021] | +0.024 | **no** |" in out
    assert "| gain vi | +8.16 [+7.91, +8.40] | +8.16 | yes |" in out
    assert "| promotion gate | refuse | undecided | **no** |" in out and "| sft promotion gate | undecided |" in out
    assert "2 of 4 fresh numbers are inside the committed 95% intervals; 1 of 2 gate decisions are the same" in out
