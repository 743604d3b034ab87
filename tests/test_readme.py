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
    """make demo, make test, and the real-base demo beside them (issue 19)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test", "make demo-real"]
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


def _result_numbers() -> list[float]:
    """Every result figure the demo writes (gains, forgettings, their intervals, tokenizer fertility)."""
    out: list[float] = []

    def walk(node, keep):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, keep or k in ("gain", "forgetting", "gain_ci95", "forgetting_ci95", "value", "ci95",
                                      "tokens_per_word", "tokens_per_word_base"))
        elif isinstance(node, list):
            for v in node:
                walk(v, keep)
        elif keep and isinstance(node, (int, float)) and not isinstance(node, bool):
            out.append(float(node))

    for name in ("eval", "gate", "sft", "tokenizer", "summary"):
        path = REPO / "metrics" / f"{name}.json"
        if path.exists():
            walk(json.loads(path.read_text(encoding="utf-8")), False)
    return out


def test_every_result_number_in_the_readme_comes_from_the_generator():
    """Hand-written sentences quoting results went stale after every rerun (+0.014 in the prose, +0.024 in the
    table): outside the generated blocks, no number may be a demo result at its printed precision."""
    import re

    text = (REPO / "README.md").read_text(encoding="utf-8")
    hand = re.sub(r"<!-- (\w[\w-]*):begin.*?<!-- \1:end -->", "", text, flags=re.S)
    results = _result_numbers()
    found = []
    for m in re.finditer(r"(?<![\w.])([+\-−]?)(\d+)\.(\d{2,})(?![\w.])", hand):
        digits = len(m.group(3))
        value = abs(float(f"{m.group(2)}.{m.group(3)}"))
        if any(abs(round(abs(r), digits) - value) < 10 ** -(digits + 2) for r in results):
            found.append(m.group(0))
    assert not found, f"README quotes demo results by hand (put them in scripts/readme_results.py): {found}"
    assert not re.findall(r"(?<![\w.])[+−]\d+\.\d+", hand), "a signed number outside the generated blocks"


def test_results_table_gets_a_real_base_column_once_the_second_demo_ran(tmp_path):
    import shutil

    shutil.copytree(REPO / "metrics", tmp_path / "metrics")
    mod = _script()
    three = mod.block(tmp_path)
    assert "real base" not in three and three.splitlines()[-3].count("|") == 4  # 3 columns until demos/smollm2 runs
    real = tmp_path / "demos" / "smollm2" / "metrics"
    shutil.copytree(REPO / "metrics", real)
    data = json.loads((real / "tokenizer.json").read_text())
    data["languages"]["vi"]["tokens_per_word"] = 1.23
    (real / "tokenizer.json").write_text(json.dumps(data))
    four = mod.block(tmp_path)
    assert "real base: SmolLM2-135M" in four
    row = next(line for line in four.splitlines() if line.startswith("| Vietnamese tokens per word"))
    assert row.count("|") == 5 and "-> 1.23" in row and "-> 2.32" not in row.split("|")[3]
