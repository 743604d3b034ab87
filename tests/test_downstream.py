"""Stage `downstream`: lm-eval's tasks on local files, cpt's BOS convention, paired intervals and the gate rule.

Real data (the evaluation-only files of ../shared/corpora), real lm-eval 0.4.13, the tiny model pair of
tests/test_eval.py; a fake lm-eval model with a known answer pattern checks the accuracy plumbing end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from cpt.errors import ConfigError, DataError  # noqa: E402
from cpt.evaluation import downstream, downstream_stats as stats  # noqa: E402
from cpt.ops import downstream_gate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, corpora):
    return downstream.write_tasks(list(downstream.TASKS), corpora, tmp_path_factory.mktemp("tasks"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------ task definitions
def test_every_local_task_loads_offline_with_the_gold_of_its_file(task_dir, corpora, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import get_task_dict

    tasks = get_task_dict([s.lm_eval_name for s in downstream.TASKS.values()], downstream.task_manager(task_dir))
    assert set(tasks) == {s.lm_eval_name for s in downstream.TASKS.values()}
    sizes = {}
    for spec in downstream.TASKS.values():
        task = tasks[spec.lm_eval_name]
        docs = list(task.test_docs())
        sizes[spec.key] = len(docs)
        assert len(docs) == len(_rows(corpora / spec.files[0])), spec.key
    assert sizes["piqa_en"] == 1838 and sizes["arc_easy_vi"] == 2372 and sizes["xcopa_vi"] == 500
    # the prompts are lm-eval's: COPA/XCOPA as xcopa, Belebele's letters, WinoGrande's partial scoring
    copa = tasks["cpt_copa_en"]
    doc = next(iter(copa.test_docs()))
    assert copa.doc_to_text(doc) == "The man turned on the faucet therefore"
    assert copa.doc_to_choice(doc) == ["the toilet filled with water.", "water flowed from the spout."]
    assert copa.doc_to_target(doc) == 1
    xvi = tasks["cpt_xcopa_vi"]
    assert xvi.doc_to_text(next(iter(xvi.test_docs()))).endswith(("bởi vì", "vì vậy"))
    wino = tasks["cpt_winogrande_en"]
    doc = next(iter(wino.test_docs()))
    assert wino.doc_to_text(doc) == 1 and wino.doc_to_target(doc) == "always got the easier cases."
    bele = tasks["cpt_belebele_vi"]
    doc = next(iter(bele.test_docs()))
    assert bele.doc_to_choice(doc) == ["A", "B", "C", "D"]
    assert bele.doc_to_target(doc) == int(_rows(corpora / "belebele/vie_Latn.jsonl")[0]["correct_answer_num"]) - 1
    arc = tasks["cpt_arc_easy_en"]
    doc = next(iter(arc.test_docs()))
    assert arc.doc_to_text(doc).startswith("Question: ") and arc.doc_to_text(doc).endswith("\nAnswer:")


def test_missing_data_file_and_unknown_task_are_named(tmp_path):
    with pytest.raises(DataError, match="piqa_valid.jsonl.*piqa_en"):
        downstream.write_tasks(["piqa_en"], tmp_path / "nowhere", tmp_path / "t")
    with pytest.raises(ConfigError, match="unknown task.*hellaswag_en"):
        downstream.specs(["hellaswag_en"])


def test_templates_ship_as_package_data(repo_root):
    shipped = {p.stem for p in downstream.template_dir().glob("*.yaml")}
    assert shipped == {s.lm_eval_name for s in downstream.TASKS.values()}
    assert '"cpt.evaluation" = ["tasks/*.yaml"]' in (repo_root / "pyproject.toml").read_text()


# ------------------------------------------------------------------ known answer pattern
class AlwaysFirst:
    """An lm-eval model that always prefers choice 0 (log-likelihood 0 for it, -1 for the others)."""

    def __new__(cls):
        from lm_eval.api.model import LM

        class _LM(LM):
            def loglikelihood(self, requests, disable_tqdm=False):
                return [(0.0 if r.idx == 0 else -1.0, False) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                return [-1.0 for _ in requests]

            def generate_until(self, requests, disable_tqdm=False):
                return ["" for _ in requests]

        return _LM()


def test_a_model_that_always_picks_choice_0_scores_the_share_of_gold_0(task_dir, corpora):
    keys = ["copa_en", "piqa_en", "arc_easy_en", "winogrande_en", "xcopa_zh"]
    res = downstream.evaluate(AlwaysFirst(), keys, task_dir, limit=30)
    rows = {k: _rows(corpora / downstream.TASKS[k].files[0])[:30] for k in keys}
    gold0 = {
        "copa_en": [r["label"] == 0 for r in rows["copa_en"]],
        "piqa_en": [r["label"] == 0 for r in rows["piqa_en"]],
        "arc_easy_en": [r["answerKey"] == r["choices"]["label"][0] for r in rows["arc_easy_en"]],
        "winogrande_en": [r["gold"] == 0 for r in rows["winogrande_en"]],
        "xcopa_zh": [r["label"] == 0 for r in rows["xcopa_zh"]],
    }
    for key in keys:
        spec = downstream.TASKS[key]
        items = res[key]["items"]
        assert len(items) == 30
        expected = [float(g) for g in gold0[key]]
        assert [items[i][spec.metric] for i in range(30)] == expected, key
        assert 0 < sum(expected) < 30, f"{key}: the first 30 items must mix gold 0 and not (a test that can fail)"


# ------------------------------------------------------------------ the BOS convention
def test_lm_eval_and_cpt_give_the_same_log_likelihood(corpora):
    """cpt's scorer (prefix token + context, continuation scored) and lm-eval through ``cpt_lm`` agree, for a
    continuation and for a whole document (rolling); lm-eval's defaults (BOS from the tokenizer, no prefix token on
    the context) give another number, so the convention is what makes them agree."""
    import torch
    from lm_eval.api.instance import Instance

    from cpt.evaluation.bpb import BpbScorer, Window
    from cpt.evaluation.models import load_model
    from test_eval import _fixture_models

    folder = _fixture_models(corpora) / "cpt"
    lm = load_model("cpt", folder, device="cpu")
    scorer = BpbScorer(lm, max_length=128, stride=96)
    pairs = [("Người đàn ông bật vòi nước vì vậy", " nước chảy ra từ vòi."),
             ("The man turned on the faucet therefore", " water flowed from the spout.")]
    seqs, windows = [], []
    for i, (ctx, cont) in enumerate(pairs):
        c_ids, whole = lm.encode([ctx])[0], lm.encode([ctx + cont])[0]
        seqs.append([lm.prefix_id, *whole])
        windows.append(Window(i, 0, len(seqs[-1]), 1 + len(c_ids)))
    ours = [-nll for nll, _ in scorer.score_windows(seqs, windows)]
    doc = "Hà Nội là thủ đô của Việt Nam."
    ours_doc = -scorer.doc_nll([doc])[0][0]

    hf = downstream.cpt_lm(folder, batch_size=2)
    theirs = [ll for ll, _ in hf.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])]
    theirs_doc = hf.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)])[0]
    np.testing.assert_allclose(theirs, ours, rtol=1e-5)
    assert theirs_doc == pytest.approx(ours_doc, rel=1e-5)

    from lm_eval.models.huggingface import HFLM

    default = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=2)
    other = [ll for ll, _ in default.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])]
    assert not np.allclose(other, ours, rtol=1e-3), "lm-eval's defaults condition differently"
    torch.set_num_threads(1)


# ------------------------------------------------------------------ paired intervals
def _synthetic(n: int, seed: int, p_base: float = 0.5, p_flip_up: float = 0.15, p_flip_down: float = 0.05):
    """Items a base answers right with p_base; cpt flips wrong -> right with p_flip_up, right -> wrong with
    p_flip_down: the true delta is (1 - p_base) * up - p_base * down (here +5 points)."""
    rng = np.random.default_rng(seed)
    base = (rng.random(n) < p_base).astype(float)
    flip = rng.random(n)
    cpt = np.where(base == 1, (flip >= p_flip_down).astype(float), (flip < p_flip_up).astype(float))
    truth = 100 * ((1 - p_base) * p_flip_up - p_base * p_flip_down)
    return dict(enumerate(base)), dict(enumerate(cpt)), truth


def test_paired_interval_contains_the_truth_and_shrinks_with_more_items():
    widths, covered = {}, {}
    for n in (100, 1600):
        hits, w = 0, []
        for rep in range(100):
            b, c, truth = _synthetic(n, seed=rep)
            r = stats.paired(b, c, resamples=400, seed=rep)
            lo, hi = r["delta_ci95"]
            hits += lo <= truth <= hi
            w.append(hi - lo)
        covered[n], widths[n] = hits / 100, float(np.mean(w))
    assert covered[100] >= 0.88 and covered[1600] >= 0.88, covered  # nominal 95%
    assert 3.0 < widths[100] / widths[1600] < 5.5, widths  # ~ sqrt(16) = 4
    # pairing matters: the paired interval is narrower than two independent binomial ones
    b, c, _ = _synthetic(400, seed=7)
    pb, pc = np.mean(list(b.values())), np.mean(list(c.values()))
    unpaired = 2 * 1.96 * 100 * np.sqrt(pb * (1 - pb) / 400 + pc * (1 - pc) / 400)
    r = stats.paired(b, c, resamples=1000, seed=0)
    assert r["delta_ci95"][1] - r["delta_ci95"][0] < 0.6 * unpaired


def test_aggregates_sign_and_gate_rule_worst_task_decides():
    from types import SimpleNamespace

    def spec(key, lang):
        return SimpleNamespace(key=key, lang=lang, metric="acc", chance=0.5)

    n = 400
    rng = np.random.default_rng(0)
    base = (rng.random(n) < 0.6).astype(float)
    worse = base.copy()
    worse[np.flatnonzero(base == 1)[:60]] = 0  # -15 points
    results = {"base": {"a_en": {"items": {i: {"acc": v} for i, v in enumerate(base)}},
                        "b_en": {"items": {i: {"acc": v} for i, v in enumerate(base)}},
                        "c_vi": {"items": {i: {"acc": v} for i, v in enumerate(worse)}}},
               "cpt": {"a_en": {"items": {i: {"acc": v} for i, v in enumerate(worse)}},
                       "b_en": {"items": {i: {"acc": v} for i, v in enumerate(base)}},
                       "c_vi": {"items": {i: {"acc": v} for i, v in enumerate(base)}}}}
    tasks = [spec("a_en", "en"), spec("b_en", "en"), spec("c_vi", "vi")]
    rows = stats.table(results, tasks, resamples=500, seed=1)
    assert rows["a_en"]["delta"] == pytest.approx(-15.0) and rows["c_vi"]["delta"] == pytest.approx(15.0)
    forgetting = stats.aggregate(results, tasks[:2], sign=-1, resamples=500, seed=1)
    gain = stats.aggregate(results, tasks[2:], sign=+1, resamples=500, seed=1)
    assert forgetting["value"] == pytest.approx(7.5) and forgetting["ci95"][0] > 0  # > 0 = forgotten
    assert gain["value"] == pytest.approx(15.0) and gain["ci95"][0] > 0  # > 0 = learned
    assert downstream_gate.checks(rows, None, {"en"}) == []  # off
    checks = downstream_gate.checks(rows, 5.0, {"en"})
    assert [c["check"] for c in checks] == ["downstream: a_en drop (points)", "downstream: b_en drop (points)"]
    assert [c["decision"] for c in checks] == ["refuse", "promote"]  # a_en: the whole interval above 5 points
    eval_gate = {"decision": "promote", "passed": True, "promoted": False}
    out = downstream_gate.rejudge({"gate": {"max_downstream_drop": 5}}, eval_gate, rows, {"en"})
    assert out["decision"] == "refuse" and out["eval_decision"] == "promote" and "a_en" in out["reason"]
    assert downstream_gate.rejudge({"gate": {"max_downstream_drop": 20}}, eval_gate, rows, {"en"})["decision"] \
        in ("promote", "undecided")
    off = downstream_gate.rejudge({}, eval_gate, rows, {"en"})
    assert off["decision"] == "promote" and off["checks"] == []


def test_a_refusal_after_a_promotion_moves_the_alias_back():
    calls = []

    class Tracker:
        active = True

        def set_alias(self, name, alias, version):
            calls.append(("set", name, alias, version))

        def delete_alias(self, name, alias):
            calls.append(("delete", name, alias))

        def set_tags(self, tags):
            calls.append(("tags", tags["cpt.downstream.decision"]))

    rows = {"a_en": {"lang": "en", "n": 100, "delta": -30.0, "delta_ci95": [-40.0, -20.0]}}
    gate = {"decision": "promote", "promoted": True, "registered_model": "cpt", "alias": "champion", "version": "4",
            "vs_champion": {"version": "3"}}
    out = downstream_gate.rejudge({"gate": {"max_downstream_drop": 5}}, gate, rows, {"en"}, Tracker())
    assert out["demoted"] and calls[0] == ("set", "cpt", "champion", "3")
    calls.clear()
    out = downstream_gate.rejudge({"gate": {"max_downstream_drop": 5}}, {**gate, "vs_champion": {}}, rows, {"en"},
                                  Tracker())
    assert out["demoted"] and calls[0] == ("delete", "cpt", "champion")


def test_summary_carries_the_aggregates_and_the_rejudged_decision():
    from cpt.ops import summary

    down = {"forgetting_en": {"value": 1.234, "ci95": [-2.0, 4.5]}, "gain_new": {"value": 3.0, "ci95": [0.5, 6.0]},
            "gate": {"checks": [{"decision": "refuse"}], "decision": "refuse"}}
    s = summary.build({}, {"decision": "promote", "passed": True}, {}, down)
    assert s["downstream"] == {"forgetting_en": 1.23, "forgetting_en_ci95": [-2.0, 4.5], "gain_new": 3.0,
                               "gain_new_ci95": [0.5, 6.0]}
    assert s["decision"] == "refuse" and s["passed"] is False and len(s) <= 12
    m = summary.mlflow_metrics(s)
    assert m["summary/downstream/gain_new/ci95_lo"] == 0.5 and m["summary/downstream/forgetting_en"] == 1.23
    # the rule off: eval's decision stands
    assert summary.build({}, {"decision": "promote", "passed": True}, {}, {**down, "gate": {"checks": []}})[
        "decision"] == "promote"


# ------------------------------------------------------------------ params and the stage
def test_params_yaml_downstream_section_is_the_code_defaults(repo_root):
    import yaml

    from cpt.stages.downstream import DEFAULTS, config

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert params["downstream"] == DEFAULTS
    assert params["gate"]["max_downstream_drop"] is None
    with pytest.raises(ConfigError, match="unknown key .max_itemz. .did you mean .max_items"):
        config({"downstream": {"max_itemz": 3}})
    with pytest.raises(ConfigError, match="gate.max_downstream_drop"):
        config({"gate": {"max_downstream_drop": "five"}})


@pytest.mark.slow
def test_stage_writes_paired_metrics_report_and_summary(tmp_path, corpora, repo_root):
    import shutil

    from cpt.cli import main
    from test_eval import _fixture_models

    models = _fixture_models(corpora)
    shutil.copytree(models / "base", tmp_path / "data" / "base")
    shutil.copytree(models / "cpt", tmp_path / "data" / "models" / "cpt")
    (tmp_path / "params.yaml").write_text(json.dumps({
        "seed": 3, "ingest": {"corpus_dir": str(corpora)}, "tracking": {"enabled": False},
        "gate": {"max_downstream_drop": 50},
        "downstream": {"tasks": ["copa_en", "xcopa_vi"], "max_items": 12, "threads": 1}}))
    assert main(["downstream", "--root", str(tmp_path), "-p", str(tmp_path / "params.yaml")]) == 0
    m = json.loads((tmp_path / "metrics" / "downstream.json").read_text())
    assert set(m["downstream"]) == {"copa_en", "xcopa_vi"}
    row = m["downstream"]["copa_en"]
    assert row["n"] == 12 and row["metric"] == "acc" and row["delta"] == pytest.approx(row["cpt"] - row["base"])
    assert row["delta_ci95"][0] <= row["delta"] <= row["delta_ci95"][1]
    assert m["forgetting_en"]["tasks"] == ["copa_en"] and m["gain_new"]["tasks"] == ["xcopa_vi"]
    assert [c["check"] for c in m["gate"]["checks"]] == ["downstream: copa_en drop (points)"]
    assert "timings" not in m  # seconds go to metrics/timings/downstream.json, not git
    assert "| copa_en | en | acc | 12 |" in (tmp_path / "reports" / "downstream.md").read_text()
    s = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert s["downstream"]["forgetting_en"] == pytest.approx(m["forgetting_en"]["value"], abs=0.01)
