"""One sign for forgetting everywhere a number appears: forgetting = bpb(cpt) - bpb(base), > 0 = forgotten (and gain =
bpb(base) - bpb(cpt), > 0 = learned). The same figure, read from the committed demo results, must show with the
same sign in reports/eval/report.md (its tables and the gate section), the figure's labels (loss_curves.png, which
`dvc plots show` displays), the README's generated block and the MLflow descriptions (the run's and the registered
version's). Everything is rendered fresh from metrics/*.json, so the test holds the renderers to the convention,
whatever numbers the last `make demo` produced."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from cpt.evaluation import report
from cpt.ops import registry_view, summary, verdict

REPO = Path(__file__).resolve().parents[1]


def _metrics(name: str) -> dict:
    return json.loads((REPO / "metrics" / f"{name}.json").read_text(encoding="utf-8"))


def _rows(ev: dict) -> list[dict]:
    """report.write_all's per-source rows, rebuilt from eval.json's per-model blocks."""
    rows = []
    for name, b in ev["base"].items():
        c = ev["cpt"][name]
        rows.append({"source": name, "lang": b["lang"], "domain": b["domain"], "origin": "", "docs": b["docs"],
                     "available": b["docs"], "truncated": 0, "bytes": b["bytes"], "base": b["bpb"], "cpt": c["bpb"],
                     "tok_base": b["tokens"], "tok_cpt": c["tokens"]})
    return rows


def _readme_block(tmp_path: Path) -> str:
    spec = importlib.util.spec_from_file_location("readme_results", REPO / "scripts" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shutil.copytree(REPO / "metrics", tmp_path / "metrics", ignore=shutil.ignore_patterns("timings"))
    return mod.block(tmp_path)


def test_forgetting_has_one_sign_in_report_figure_readme_and_mlflow(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    ev, gate = _metrics("eval"), _metrics("gate")
    rows = _rows(ev)
    cfg = {"unit_bytes": 4096, "max_bytes": 20000, "max_bytes_old": 200000, "max_docs": None}
    page = report.report_markdown(ev, rows, {}, cfg, None, tmp_path / "curve.csv", False)
    page = page.replace(f"{verdict.START}\n\n(written by the gate after eval: metrics/gate.json)\n\n{verdict.END}",
                        verdict.markdown(gate))
    from cpt.evaluation.figures import write_figure

    assert write_figure(tmp_path / "loss_curves.png", {}, rows) is None
    with Image.open(tmp_path / "loss_curves.png") as img:
        panels = img.text["Panels"]
    readme = _readme_block(tmp_path)
    headline = summary.build(ev, gate, {})
    mlflow_run = summary.markdown(headline, gate)
    mlflow_version = registry_view.description(gate)

    old = {n: v for n, v in gate["per_source"].items() if v["metric"] == "forgetting"}
    assert old, "the demo has old-domain (English) sources"
    for name, v in old.items():
        forgot = v["value"]
        assert forgot == pytest.approx(ev["sources"][name]["cpt_bpb"] - ev["sources"][name]["base_bpb"], abs=1e-5)
        four, three = f"{forgot:+.4f}", f"{forgot:+.3f}"
        flipped = (f"{-forgot:+.4f}", f"{-forgot:+.3f}")
        # report.md: the per-source table and the gate's table name the measure and print it with its own sign
        assert re.search(rf"\| {name} \|[^\n]*\| forgetting \| {re.escape(four)} \|", page), name
        assert f"| source | {name} | old | forgetting | {four} |" in page
        assert not any(re.search(rf"\| {name} \|[^\n]*\| {re.escape(f)} \|", page) for f in flipped), name
        # the figure's old-language panel: "forgetting (> 0 = forgotten)", each bar labelled with the same number
        assert f"{name} {three}" in panels and f"{name} {flipped[1]}" not in panels, panels
        # the README's generated table
        assert f"{name} {three}" in readme and f"{name} {flipped[1]}" not in readme
    assert "forgetting (> 0 = forgotten)" in panels
    for lang, forgot in ev["forgetting"].items():  # pooled per language: MLflow descriptions and the README
        shown = f"{forgot:+.3f}"
        assert f"| {lang} | {shown} |" in mlflow_run and "forgotten (old language)" in mlflow_run
        assert f"{lang} {shown} bpb forgotten" in summary.headline(headline, gate)
        assert f"forgetting: {lang} {summary._signed(forgot, summary._digits(forgot))}" in mlflow_version
        assert f"{lang} {shown}" in readme
        assert f"| {lang} | old |" in page and f"| forgetting | {ev['forgetting'][lang]:+.4f} |" in page
    # nothing on the report page uses the old "delta" convention any more
    assert "delta" not in page.lower()


def test_a_hand_made_case_reads_the_same_everywhere(tmp_path):
    """A source that forgot 0.082 bpb and one that improved by 0.068 (forgetting -0.068), in every renderer."""
    from PIL import Image

    from cpt.evaluation.figures import write_figure

    pytest.importorskip("matplotlib")
    rows = [{"source": "heldout_en", "domain": "old", "base": 2.5644, "cpt": 2.6465},
            {"source": "xquad_en", "domain": "old", "base": 3.2263, "cpt": 3.1584},
            {"source": "ntrex_vi", "domain": "new", "base": 10.70, "cpt": 2.54}]
    write_figure(tmp_path / "f.png", {}, rows)
    with Image.open(tmp_path / "f.png") as img:
        panels = img.text["Panels"].splitlines()
    forgetting = panels[panels.index("old language, per source: forgetting (> 0 = forgotten)") + 1:]
    assert forgetting == ["heldout_en +0.082", "xquad_en -0.068"]
    v = {"metric": "forgetting", "value": 0.0821, "ci95": [0.0774, 0.0872], "budget": 0.05, "decision": "refuse",
         "domain": "old"}
    assert verdict.as_shown(v) == (0.0821, [0.0774, 0.0872], "upper bound <= 0.05")
    gate = {"decision": "refuse", "per_source": {"heldout_en": v}, "per_lang": {}, "thresholds": {
        "min_gain": 0.02, "max_forgetting": 0.05}, "reason": "refuse: source heldout_en: ..."}
    assert summary.deciding(gate) == "heldout_en forgetting +0.082 (95% interval [+0.077, +0.087]) > 0.05"
    assert registry_view.description(gate).startswith("refuse: heldout_en forgetting +0.082 (95% interval [+0.077, +0.087]) > 0.05")
