"""Stage `merge`: theta(a) = (1 - a) base + a cpt between two real tiny models, scored by eval's scorer on eval's
units and judged by the gate.

Fixtures: a byte-level BPE base trained a few steps on English, and a cpt model that extends the base's vocabulary
(Vietnamese words appended as tokens, rows resized as train does) and is trained a few steps on Vietnamese + English,
so the interpolation crosses a vocabulary extension the way the pipeline's does. The eval stage runs for real first
(it writes the base's and the cpt's per-unit records the merge reuses).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cpt.errors import ConfigError, DataError
from cpt.evaluation import record
from cpt.evaluation.models import load_model
from cpt.io import read_json
from cpt.layout import Layout
from cpt.merge import frontier, interpolate, points
from cpt.stages.merge import config
from test_eval import corpus_slices, make_project, train_tiny, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW_WORDS = ["của", "là", "và", "các", "những", "được", "trong", "một", "người", "không", "năm", "này", "với", "có"]


def build_pair(out: Path, corpora: Path, *, extend: bool = True) -> tuple[Path, Path]:
    """(base folder, cpt folder): the cpt keeps every base token at its id and (``extend``) appends new ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = corpus_slices(corpora)
    tok = train_tokenizer(s["en"][:10] + s["vi"][:2], 400)
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    train_tiny(model, tok, s["en"][:16], 15, seed=1)
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    if extend:
        tok.add_tokens(NEW_WORDS)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():  # new rows: the mean of the old rows (train's `mean` init)
            for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
                w[-len(NEW_WORDS):] = w[: -len(NEW_WORDS)].mean(0)
    train_tiny(model, tok, s["vi"][:30] + s["en"][:4], 25, seed=2)
    model.save_pretrained(out / "cpt")
    tok.save_pretrained(out / "cpt")
    return out / "base", out / "cpt"


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory, corpora) -> tuple[Path, Path]:
    return build_pair(tmp_path_factory.mktemp("mergemodels"), corpora)


def params_for(corpora: Path, **gate) -> dict:
    return {"seed": 7, "tracking": {"enabled": False}, "ingest": {"corpus_dir": str(corpora)},
            "eval": {"max_length": 64, "stride": 32, "max_docs": 30, "max_bytes": 20000, "threads": 1,
                     "unit_bytes": 1000, "bootstrap_resamples": 200, "overlap": {"enabled": False},
                     "samples": {"enabled": False}},
            "gate": {"min_gain": 0.0, "max_forgetting": 5.0, "min_documents": 2, **gate},
            "merge": {"grid": [0.5]}}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, corpora, pair_dirs):
    """A project after `cpt eval` (records of base and cpt on the same units), the models swapped for the pair."""
    from cpt.cli import run_stage

    import test_eval

    with pytest.MonkeyPatch.context() as mp:  # make_project copies this pair instead of training eval's own
        mp.setattr(test_eval, "_fixture_models", lambda corpora: pair_dirs[0].parent)
        layout = make_project(tmp_path_factory.mktemp("merge"), corpora)
    params = params_for(corpora)
    eval_metrics = run_stage("eval", params, layout)
    return layout, params, eval_metrics


@pytest.fixture(scope="module")
def merged(evaluated):
    """`cpt merge` with lenient budgets (grid [0.5]) after eval."""
    from cpt.cli import run_stage

    layout, params, _ = evaluated
    return run_stage("merge", params, layout)


@pytest.mark.slow  # one tiny eval + merge run shared by the module (~50 s on 2 cores)
def test_stage_reuses_eval_endpoints_and_chooses_the_largest_passing_a(evaluated, merged):
    layout, params, ev = evaluated
    m = merged
    assert read_json(layout.metrics_file("merge"))["chosen"] == m["chosen"]
    assert [p["alpha"] for p in m["points"]] == [0.0, 0.5, 1.0]
    zero, half, one = m["points"]
    assert zero["scored"].startswith("eval record") and one["scored"].startswith("eval record")
    # a = 1 is the cpt model of eval, to the digit: the same units, the same scores, the same bootstrap
    for key in ("gain", "gain_ci95", "forgetting", "forgetting_ci95"):
        assert one[key] == ev[key], key
    for name, row in one["sources"].items():
        kind = "gain" if row["domain"] == "new" else "forgetting"
        assert row[kind] == ev["sources"][name][kind] and row[f"{kind}_ci95"] == ev["sources"][name][f"{kind}_ci95"]
        assert row["bpb"] == ev["sources"][name]["cpt_bpb"] and row["documents"] == ev["sources"][name]["documents"]
    # a = 0 is the base against itself
    assert all(v == 0 for v in zero["gain"].values()) and all(v == 0 for v in zero["forgetting"].values())
    # the middle point lies between: the tiny cpt learned Vietnamese, and half the update keeps part of it
    assert 0 < half["gain"]["vi"] < one["gain"]["vi"] and 0 < half["gain_kept"]["vi"] < 100
    assert one["gain_kept"]["vi"] == 100.0
    for p in m["points"]:
        lo, hi = p["forgetting_ci95"]["en"]
        assert lo <= p["forgetting"]["en"] <= hi
    # lenient budgets: every point with a gain passes, a = 1 is the largest -> the cpt model itself, nothing merged
    passing = [p["alpha"] for p in m["points"] if p["decision"] == "promote"]
    assert m["chosen"] == max(passing) == 1.0 and "nothing merged" in m["reason"]
    assert m["max_forgetting"] == 5.0 and m["gate"] is None
    assert read_json(layout.root / "data/models/merged/merge.json")["model"] is None
    assert not (layout.root / "data/models/merged/config.json").exists()
    png = layout.reports / "merge" / "frontier.png"
    from PIL import Image

    assert Image.open(png).size == (720, 480)
    assert read_json(layout.metrics / "timings" / "merge.json")["timings"]["a=0.5"] > 0  # time per point, not in git
    assert "timings" not in read_json(layout.metrics_file("merge"))


@pytest.mark.slow
def test_chosen_point_is_written_as_the_interpolation_and_none_passing_says_why(evaluated, merged):
    from cpt.cli import run_stage

    layout, params, _ = evaluated
    by_a = {p["alpha"]: p for p in merged["points"]}
    hi_1 = max(r["forgetting_ci95"][1] for r in by_a[1.0]["sources"].values() if r["domain"] == "old")
    lo_1 = min(r["forgetting_ci95"][0] for r in by_a[1.0]["sources"].values() if r["domain"] == "old")
    worst_half = by_a[0.5]["binding"]["forgetting"]["ci95"][1]
    if not worst_half < lo_1:
        pytest.skip(f"the fixture's a=0.5 does not separate from a=1 ({worst_half} vs [{lo_1}, {hi_1}])")
    # a budget between a = 0.5's upper bound and a = 1's lower bound: a = 1 is refused, a = 0.5 is chosen
    budget = round((worst_half + lo_1) / 2, 6)
    tight = {**params, "gate": {**params["gate"], "max_forgetting": budget}}
    m = run_stage("merge", tight, layout)
    assert m["chosen"] == 0.5 and m["max_forgetting"] == budget
    assert m["reason"].startswith("a=0.5 is the largest a the gate promotes") and "a=1: refuse" in m["reason"]
    assert m["gate"]["decision"] == "promote" and "tracking off" in m["gate"]["reason"]
    merged = Path(layout.root / "data/models/merged")
    assert read_json(merged / "merge.json")["alpha"] == 0.5
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(layout.base).named_parameters())
    cpt = dict(AutoModelForCausalLM.from_pretrained(layout.model).named_parameters())
    got = dict(AutoModelForCausalLM.from_pretrained(merged).named_parameters())
    n = len(NEW_WORDS)
    for name, c in cpt.items():
        b = base[name]
        if b.shape == c.shape:
            torch.testing.assert_close(got[name], 0.5 * b + 0.5 * c, rtol=0, atol=1e-6)
        else:  # a vocabulary matrix: shared rows interpolated, new rows the cpt's, unscaled
            torch.testing.assert_close(got[name][:-n], 0.5 * b + 0.5 * c[:-n], rtol=0, atol=1e-6)
            assert torch.equal(got[name][-n:], c[-n:])
    # the merged folder is a model eval can load (the cpt tokenizer came along) and its record is on eval's units
    from transformers import AutoTokenizer

    assert load_model("merged", merged).tokenizer.get_vocab() == AutoTokenizer.from_pretrained(layout.model).get_vocab()
    rec = read_json(layout.root / "data/merge/a0.5000.json")
    assert record.matches(rec, read_json(record.path(layout)))[0]
    # no a passes (the endpoints only: nothing is scored): chosen is null, the reason names every point, and the
    # folder holds only merge.json saying why (the earlier merged model does not stay behind looking current)
    none = run_stage("merge", {**params, "gate": {**params["gate"], "min_gain": 1000.0}, "merge": {"grid": []}},
                     layout)
    assert none["chosen"] is None and none["reason"].startswith("no a passes the gate: a=1: refuse")
    assert "a=0: refuse" in none["reason"] and "min_gain 1000" in none["reason"]
    assert sorted(p.name for p in merged.iterdir()) == ["merge.json"]
    assert read_json(merged / "merge.json")["reason"] == none["reason"]


@pytest.mark.slow
def test_endpoints_scored_through_the_merge_reproduce_eval_records(evaluated):
    """a = 1 written into the model and scored by eval's scorer gives the cpt's record, unit for unit."""
    layout, params, _ = evaluated
    from cpt.merge.run import _load
    from cpt.stages.eval import config as eval_config

    cfg = eval_config(params)
    sources, base_rec, cpt_rec, conf = points.eval_records(layout, cfg, params["seed"])
    lm, pair = _load(layout.base, layout.model, cfg)
    from transformers import AutoTokenizer

    assert pair.shared == len(AutoTokenizer.from_pretrained(layout.base)) and pair.vocab == {"model.embed_tokens.weight", "lm_head.weight"}
    interpolate.apply(lm.model, pair, 1.0)
    got = record.of_scores(sources, points.score(lm, sources, cfg), conf)
    for name, r in cpt_rec.items():
        assert got[name]["hash"] == r["hash"]
        assert got[name]["units"]["nll"] == pytest.approx(r["units"]["nll"], abs=1e-6)
    # weights at a = 0 are the base's shared weights bit for bit, and the cpt's new rows
    interpolate.apply(lm.model, pair, 0.0)
    for name, p in lm.model.named_parameters():
        assert torch.equal(p[: pair.shared] if name in pair.vocab else p,
                           pair.base[name][: pair.shared] if name in pair.vocab else pair.base[name])
        if name in pair.vocab:
            assert torch.equal(p[pair.shared:], pair.cpt[name][pair.shared:])


@pytest.mark.slow
def test_without_a_vocabulary_change_a_zero_scores_as_the_base(tmp_path, corpora, evaluated):
    """With the base's own tokenizer, theta(0) is the base: scored through the merge it gives the base's scores."""
    layout, params, _ = evaluated
    base_dir, cpt_dir = build_pair(tmp_path, corpora, extend=False)
    from cpt.merge.run import _load
    from cpt.stages.eval import config as eval_config

    cfg = eval_config(params)
    sources = points.collect_sources(layout, cfg, params["seed"])[:2]
    lm, pair = _load(base_dir, cpt_dir, cfg)
    interpolate.apply(lm.model, pair, 0.0)
    merged0 = points.score(lm, sources, cfg)
    base = points.score(load_model("base", base_dir), sources, cfg)
    for s in sources:
        assert merged0[s.name].doc_nll == pytest.approx(base[s.name].doc_nll, abs=1e-6)


def test_a_cpt_tokenizer_that_moves_base_tokens_is_refused(tmp_path, corpora):
    import json

    tok = train_tokenizer(corpus_slices(corpora)["en"][:4], 300)
    tok.save_pretrained(tmp_path / "base")
    tok.add_tokens(NEW_WORDS[:3])
    tok.save_pretrained(tmp_path / "cpt")
    assert interpolate.shared_rows(tmp_path / "base", tmp_path / "cpt") == 300
    spec = json.loads((tmp_path / "cpt" / "tokenizer.json").read_text())
    v = spec["model"]["vocab"]
    a, b = sorted(v, key=v.get)[10:12]
    v[a], v[b] = v[b], v[a]
    (tmp_path / "cpt" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="does not extend the base") as exc:
        interpolate.shared_rows(tmp_path / "base", tmp_path / "cpt")
    assert f"2 base tokens moved or missing, first {a!r} (id {v[b]} in the base, {v[a]} in the cpt)" in str(exc.value)


def test_choose_and_config_rules():
    def p(a, d, r="x"):
        return {"alpha": a, "decision": d, "reason": f"{d}: {r}"}

    assert frontier.choose([p(0.0, "refuse"), p(0.25, "promote"), p(0.5, "promote"), p(0.75, "undecided"),
                            p(1.0, "refuse")])[0] == 0.5
    chosen, why = frontier.choose([p(0.0, "refuse"), p(0.5, "undecided"), p(1.0, "refuse", "forgot")])
    assert chosen is None and why == "no a passes the gate: a=1: refuse: forgot; a=0.5: undecided: x; a=0: refuse: x"
    assert config({"merge": {"grid": [0.75, 0.25, 0.25]}})["grid"] == [0.25, 0.75]
    for bad in ([0.0, 0.5], [1.0], "0.5", [True]):
        with pytest.raises(ConfigError, match="merge.grid"):
            config({"merge": {"grid": bad}})
    with pytest.raises(ConfigError, match="grd"):
        config({"merge": {"grd": [0.5]}})
    # the binding numbers: the forgetting with the highest upper bound, the gain with the lowest lower bound
    m = {"sources": {"a": {"forgetting": 0.08, "forgetting_ci95": [0.07, 0.09]},
                     "b": {"forgetting": 0.01, "forgetting_ci95": [-0.1, 0.12]},
                     "c": {"gain": 8.0, "gain_ci95": [7.0, 9.0]}},
         "gain": {"vi": 8.0}, "gain_ci95": {"vi": [7.5, 8.5]}, "forgetting": {"en": 0.02},
         "forgetting_ci95": {"en": [0.0, 0.03]}}
    b = frontier.binding(m)
    assert b["forgetting"]["name"] == "source b" and b["gain"]["name"] == "source c"


def test_frontier_png_is_written_with_experiments(tmp_path):
    pts = [{"alpha": a, "binding": {"forgetting": {"value": 0.1 * a, "ci95": [0.1 * a - 0.01, 0.1 * a + 0.01]},
                                    "gain": {"value": 8 * a, "ci95": [8 * a - 0.3, 8 * a + 0.3]}}}
           for a in (0.0, 0.25, 0.5, 1.0)]
    exps = [{"label": "replay=0.5", "binding": {"forgetting": {"value": 0.03, "ci95": None},
                                               "gain": {"value": 6.0, "ci95": [5.5, 6.5]}}}]
    out = frontier.plot(tmp_path / "f.png", pts, max_forgetting=0.05, min_gain=0.02, chosen=0.25, experiments=exps)
    from PIL import Image

    img = Image.open(out)
    assert img.size == (720, 480) and "gain" in img.info["Description"]
