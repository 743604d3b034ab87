"""What a reader sees in reports/: the eval figure (readable ticks, per-source deltas on their own axes), the samples
warning when the model is too small to generate, and the self-contained validation page."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpt.evaluation import figures
from cpt.evaluation.report import degenerate, samples_markdown
from cpt.data.checks import validation_markdown

CFG = {"samples": {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 40}}
ROWS = [{"source": "ntrex_vi", "domain": "new", "base": 10.57, "cpt": 2.32},
        {"source": "ntrex_ja", "domain": "new", "base": 18.83, "cpt": 4.37},
        {"source": "ntrex_en", "domain": "old", "base": 3.06, "cpt": 3.11}]


def test_samples_of_a_tiny_model_open_with_a_warning_and_mark_degenerate_text():
    samples = {name: [{"lang": "vi", "prompt": "Hà Nội là", "greedy": ",000000000000000000", "sampled": ""}]
               for name in ("base", "cpt")}
    text = samples_markdown(samples, CFG, {"base": {"params": 3.2e6}, "cpt": {"params": 11.2e6}})
    assert "too small to generate text" in text and "base 3.2M, cpt 11.2M" in text
    assert "*(one character repeated)*" in text and "*(empty)*" in text
    big = {name: [{"lang": "vi", "prompt": "Hà Nội là", "greedy": " thủ đô của Việt Nam.",
                   "sampled": " một thành phố lớn."}] for name in ("base", "cpt")}
    assert "Warning" not in samples_markdown(big, CFG, {"base": {"params": 7e9}, "cpt": {"params": 7e9}})
    assert degenerate("the the the the the the") == "a loop" and degenerate("Sông Mê Kông chảy qua") is None
    loop = " of the same other was the same other, and the same other, and the same other, and the same other, and"
    assert degenerate(loop) == "a loop"
    assert degenerate("s, I your shallon evil at the moment. But, the maping of the name to be re") is None


def test_eval_figure_has_readable_tick_labels_and_deltas_on_their_own_axes(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = {"step": [0.0, 20, 40, 60, 80], "tokens": [0.0, 40800, 81600, 122400, 163200],
             "loss_new": [9.4, 6.5, 6.0, 5.9, 5.8], "loss_old": [6.0, 6.5, 6.3, 6.2, 6.2]}
    fig, ax = plt.subplots()
    figures.draw_loss(ax, curve)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(len(lbl) <= 5 for lbl in labels) and any(lbl.endswith("k") for lbl in labels), labels
    assert {line.get_label() for line in ax.get_lines()} >= {"new language (val)", "old language (val, replayed)"}
    plt.close(fig)
    assert figures.write_figure(tmp_path / "f.png", curve, ROWS) is None and (tmp_path / "f.png").stat().st_size > 0
    fig, (_, a2, a3) = plt.subplots(1, 3)
    figures._panel(a2, [r for r in ROWS if r["domain"] == "new"], "gain")
    figures._panel(a3, [r for r in ROWS if r["domain"] == "old"], "forgetting")
    lo, hi = a3.get_xlim()
    assert hi - lo < 1.0  # the old language's -0.05 is read on its own axis, not beside +14
    fig.canvas.draw()
    ticks = [t.get_text() for t in a3.get_xticklabels() if t.get_text()]
    assert 2 <= len(ticks) <= 6, ticks  # few enough that "-0.075" and "-0.050" never run together
    plt.close(fig)


def test_validation_page_is_self_contained():
    metrics = {"success": False, "evaluated": 2, "failed": 1, "docs": 10, "sources": 2, "expectations": {
        "train_vi_length": {"expectation": "expect_column_values_to_be_between", "column": "chars",
                            "row_condition": {"pass_through_filter": 'lang=="vi"'}, "success": False,
                            "unexpected_count": 1, "element_count": 10, "examples": ["viwiki:7"],
                            "bounds": "[100, 20000000]"},
        "role_known": {"expectation": "expect_column_values_to_be_in_set", "column": "role", "row_condition": None,
                       "success": True, "unexpected_count": 0, "element_count": 10, "examples": [],
                       "bounds": "{eval, train}"}}}
    page = validation_markdown(metrics)
    assert "**FAILED**: 1 of 2" in page and "[100, 20000000]" in page and "`viwiki:7`" in page
    assert "http" not in page and "<script" not in page
