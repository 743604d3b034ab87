"""The README a newcomer reads: two commands first, short, and its results table generated from the committed demo
outputs (scripts/readme_results.py), so a number in it can never drift from metrics/."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("readme_results", REPO / "scripts" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_starts_with_the_two_commands_and_stays_short():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert len(text.splitlines()) <= 150


def test_results_table_is_generated_from_the_committed_metrics():
    assert _script().main(["--check", "--root", str(REPO)]) == 0, "run: python scripts/readme_results.py"


def test_a_stale_number_is_caught(tmp_path):
    mod = _script()
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({"gain": {"vi": 7.8}, "gain_ci95": {"vi": [7.6, 8.0]}}))
    (tmp_path / "README.md").write_text(f"# x\n{mod.BEGIN}\n| gain, vi | +9.999 |\n{mod.END}\n")
    assert mod.main(["--check", "--root", str(tmp_path)]) == 1
    assert mod.main(["--root", str(tmp_path)]) == 0 and mod.main(["--check", "--root", str(tmp_path)]) == 0
    assert "vi +7.80 [+7.60, +8.00]" in (tmp_path / "README.md").read_text()
