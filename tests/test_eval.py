"""Stage `eval`: bits per byte is exact, the sliding window scores every token once with the promised context,
and the stage turns two model folders into gain/forgetting and a report.

Fixtures are real: a byte-level BPE trained on a slice of the corpora and tiny Llama models saved with
save_pretrained; the cpt fixture has a different (larger) tokenizer and is trained a few steps on Vietnamese, so the
comparison crosses a vocabulary change the way the real pipeline's does.
"""

from __future__ import annotations

import atexit
import gzip
import itertools
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cpt.errors import ConfigError
from cpt.evaluation.bpb import BpbScorer, plan_windows
from cpt.evaluation.models import load_model
from cpt.io import read_json, write_jsonl
from cpt.layout import Layout
from cpt.data.records import SourceInfo, write_manifest


# ---------------------------------------------------------------- fixtures (also imported by test_eval_overlap.py)
def train_tiny(model, tok, texts: list[str], steps: int, seed: int) -> None:
    """A few AdamW steps on random 64-token windows of ``texts`` (BOS before each): the fixtures' tiny models."""
    ids = [i for t in texts for i in [tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]]]
    data = torch.tensor(ids[: (len(ids) // 64) * 64]).view(-1, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = data[torch.randint(len(data), (8,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()


def corpus_slices(corpora: Path) -> dict[str, list[str]]:
    with gzip.open(corpora / "viwiki" / "viwiki.jsonl.gz", "rt", encoding="utf-8") as fh:
        vi = [json.loads(line)["text"][:3000] for line in itertools.islice(fh, 40)]
    with gzip.open(corpora / "en_gutenberg" / "en_gutenberg_books.jsonl.gz", "rt", encoding="utf-8") as fh:
        book = json.loads(fh.readline())["text"]
    en = [book[i : i + 2500] for i in range(0, 60_000, 2500)]
    ntrex = corpora / "ntrex128"
    return {
        "vi": vi,
        "en": en,
        "ntrex_vi": (ntrex / "newstest2019-ref.vie.txt").read_text(encoding="utf-8").splitlines()[:60],
        "ntrex_en": (ntrex / "newstest2019-src.eng.txt").read_text(encoding="utf-8").splitlines()[:60],
    }


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (every string encodes, no <unk>), wrapped as an HF fast tokenizer with BOS/EOS/PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model_dir(path: Path, tok_texts: list[str], vocab_size: int, seed: int, train_texts: list[str] = (),
                    steps: int = 0, max_pos: int = 128) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(tok_texts, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_pos, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster than two fighting the rest of the suite
    if steps:
        train_tiny(model, tok, train_texts, steps, seed)
    torch.set_num_threads(threads)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_shards(folder: Path, tokenizer_dir: Path, streams: dict[str, list[str]]) -> None:
    """data/shards in the architecture's format: flat uint16 ids, documents joined with EOS, meta.json."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    splits = {}
    for name, texts in streams.items():
        ids = []
        for t in texts:
            ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        np.asarray(ids, dtype="<u2").tofile(folder / f"{name}.bin")
        splits[name] = {"tokens": len(ids), "docs": len(texts), "bytes": sum(len(t.encode()) for t in texts)}
    (folder / "meta.json").write_text(json.dumps({
        "dtype": "uint16", "block_size": 64, "vocab_size": len(tok), "eos_id": tok.eos_token_id,
        "tokenizer": str(tokenizer_dir), "splits": splits,
    }))


_MODELS: dict[str, Path] = {}


def _fixture_models(corpora: Path) -> Path:
    """The base/cpt model pair, built once per test session (training them is the slow part) and copied."""
    if "dir" not in _MODELS:
        out = Path(tempfile.mkdtemp(prefix="cpt-eval-models-"))
        atexit.register(shutil.rmtree, out, True)
        s = corpus_slices(corpora)
        tok_text = s["en"][:10] + s["vi"][:3]
        build_model_dir(out / "base", tok_text, 400, seed=1, train_texts=s["en"][:16], steps=20)
        build_model_dir(out / "cpt", tok_text + s["vi"][:20], 700, seed=2, train_texts=s["vi"][:30] + s["en"][:4],
                        steps=40)
        _MODELS["dir"] = out
    return _MODELS["dir"]


def make_project(root: Path, corpora: Path, *, leak: bool = False) -> Layout:
    """A project root as the pipeline leaves it before `eval`: clean records, base + cpt models, shards, curve."""
    layout = Layout(root)
    s = corpus_slices(corpora)
    clean = layout.clean
    clean.mkdir(parents=True)
    recs = {
        "viwiki": [dict(lang="vi", domain="new", role="train", text=t) for t in s["vi"][:30]],
        "en_books": [dict(lang="en", domain="old", role="train", text=t) for t in s["en"][:16]],
        "ntrex_vi": [dict(lang="vi", domain="new", role="eval", text=t) for t in s["ntrex_vi"]],
        "ntrex_en": [dict(lang="en", domain="old", role="eval", text=t) for t in s["ntrex_en"]],
    }
    infos = []
    for name, rows in recs.items():
        for i, r in enumerate(rows):
            r.update(id=f"{name}/{i}", source=name)
        write_jsonl(clean / f"{name}.jsonl", rows)
        infos.append(SourceInfo(name, rows[0]["lang"], rows[0]["domain"], rows[0]["role"], f"{name}.jsonl", len(rows)))
    write_manifest(clean, infos)
    models = _fixture_models(corpora)
    shutil.copytree(models / "base", layout.base)
    shutil.copytree(models / "cpt", layout.model)
    heldout = [dict(id=f"viwiki/h{i}", source="viwiki", lang="vi", domain="new", role="train", text=t)
               for i, t in enumerate(s["vi"][30:36])]
    heldout += [dict(id=f"en_books/h{i}", source="en_books", lang="en", domain="old", role="train", text=t)
                for i, t in enumerate(s["en"][16:20])]
    layout.shards.mkdir(parents=True)
    write_jsonl(layout.shards / "heldout.jsonl", heldout)
    new_train = s["vi"][:30] + (s["ntrex_vi"][5:8] if leak else [])
    write_shards(layout.shards, layout.model, {"new/train": new_train, "old/train": s["en"][:16]})
    layout.metrics.mkdir(parents=True)
    (layout.metrics / "train_curve.csv").write_text(
        "step,tokens,lr,loss_new,loss_old,bpb_new,bpb_old\n0,0,0.0,6.5,5.0,3.1,2.4\n10,640,1e-3,5.2,5.1,2.5,2.45\n"
        "20,1280,5e-4,4.6,5.15,2.2,2.47\n"
    )
    return layout


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fixture_models(tmp_path_factory, corpora):
    root = tmp_path_factory.mktemp("evalmodels")
    s = corpus_slices(corpora)
    base = build_model_dir(root / "base", s["en"][:10] + s["vi"][:3], 400, seed=1, max_pos=256,
                           train_texts=s["en"][:16], steps=30)
    return {"base": base, "texts": s}


# ---------------------------------------------------------------- sliding window
@pytest.mark.parametrize("n,length,stride", [(2, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 1), (50, 8, 7), (101, 16, 5)])
def test_windows_score_every_target_once_with_promised_context(n, length, stride):
    windows = plan_windows(n, length, stride)
    scored = [t for w in windows for t in range(w.first, w.end)]
    assert scored == list(range(1, n))  # every target 1..n-1, once, in order
    for w in windows:
        assert 0 <= w.begin < w.first <= w.end <= n and w.end - w.begin <= length
    for w in windows[1:]:
        assert w.first - w.begin >= length - stride  # context before the first new target


def test_windows_reject_a_stride_that_would_skip_tokens():
    with pytest.raises(ValueError):
        plan_windows(20, 8, 8)


def _hf_loss(model, ids: list[int]) -> float:
    """HF's own mean token loss over ids[1:] given ids (labels are shifted inside the model)."""
    t = torch.tensor([ids])
    with torch.no_grad():
        return float(model(input_ids=t, labels=t).loss)


def test_bpb_is_token_loss_times_tokens_over_bytes_over_ln2(fixture_models):
    lm = load_model("base", fixture_models["base"], device="cpu")
    texts = fixture_models["texts"]["ntrex_vi"][:5] + fixture_models["texts"]["ntrex_en"][:5]
    score = BpbScorer(lm, max_length=256, stride=32, batch_size=3).score(texts)
    # this fixture's tokenizer adds no BOS, so in its shards a document follows the previous one's EOS: that is
    # what eval conditions on (cpt.tok.codec), not the unused bos_token
    assert lm.prefix_id == lm.tokenizer.eos_token_id != lm.tokenizer.bos_token_id
    nll, tokens, nbytes = 0.0, 0, 0
    for text in texts:
        ids = [lm.tokenizer.eos_token_id] + lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) <= 256, "fixture sentence must fit the window for this test"
        nll += _hf_loss(lm.model, ids) * (len(ids) - 1)
        tokens += len(ids) - 1
        nbytes += len(text.encode("utf-8"))
    assert score.tokens == tokens and score.bytes == nbytes and score.docs == len(texts)
    assert score.loss == pytest.approx(nll / tokens, rel=1e-5)
    assert score.bpb == pytest.approx(nll / tokens * tokens / nbytes / math.log(2), rel=1e-5)
    assert score.ppl == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    # Vietnamese costs the English-centric fixture more bits per byte than English does: the unit is not vacuous.
    vi = BpbScorer(lm, 64, 32).score(texts[:5]).bpb
    en = BpbScorer(lm, 64, 32).score(texts[5:]).bpb
    assert vi != pytest.approx(en, rel=0.02)


def test_sliding_window_equals_full_context_when_the_text_fits(fixture_models):
    lm = load_model("base", fixture_models["base"], device="cpu")
    text = fixture_models["texts"]["en"][0][:150]
    ids = [lm.prefix_id] + lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 20 < len(ids) <= 128
    full = _hf_loss(lm.model, ids) * (len(ids) - 1)
    for stride in (1, 50, 127):
        (nll, n), = BpbScorer(lm, max_length=128, stride=stride).doc_nll([text])
        assert n == len(ids) - 1 and nll == pytest.approx(full, rel=1e-5)
    # ... and a window too short for the text does change the number (so the equality above can fail).
    (short, n), = BpbScorer(lm, max_length=8, stride=4).doc_nll([text])
    assert n == len(ids) - 1 and abs(short - full) > 1e-4 * full


def test_long_document_each_token_sees_exactly_window_minus_one_tokens_with_stride_one(fixture_models):
    lm = load_model("base", fixture_models["base"], device="cpu")
    text = fixture_models["texts"]["en"][1][:160]
    ids = [lm.prefix_id] + lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    L = 12
    assert len(ids) > 3 * L
    # Reference, one forward per target: the first window predicts 1..L-1 from the full prefix; every later target
    # t is predicted from exactly ids[t-L+1:t].
    ref = _hf_loss(lm.model, ids[:L]) * (L - 1)
    for t in range(L, len(ids)):
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids[t - L + 1 : t]])).logits[0, -1]
        ref -= float(torch.log_softmax(logits.float(), -1)[ids[t]])
    (nll, n), = BpbScorer(lm, max_length=L, stride=1, batch_size=7).doc_nll([text])
    assert n == len(ids) - 1 and nll == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------- the stage
def test_stage_reports_gain_forgetting_and_samples(tmp_path, corpora):
    from cpt.cli import run_stage

    layout = make_project(tmp_path, corpora)
    params = {
        "seed": 7,
        "tracking": {"enabled": False},  # MLflow is the ops stage's concern (and its own tests)
        "ingest": {"corpus_dir": str(corpora)},
        "eval": {"max_length": 64, "stride": 32, "max_docs": 30, "max_bytes": 20000, "threads": 1, "unit_bytes": 1000,
                 "samples": {"max_new_tokens": 8, "prompts": {"vi": ["Hà Nội là"], "en": ["The"]}}},
    }
    m = run_stage("eval", params, layout)
    assert read_json(layout.metrics_file("eval"))["gain"] == m["gain"]
    sources = {"ntrex_vi", "ntrex_en", "heldout_vi", "heldout_en"}
    for model in ("base", "cpt"):
        assert set(m[model]) == sources
        for r in m[model].values():
            assert r["bpb"] > 0 and r["tokens"] > 0 and r["bytes"] > 0
            assert r["bpb"] == pytest.approx(r["loss"] * r["tokens"] / r["bytes"] / math.log(2), rel=1e-4)
    # bytes are a property of the text, not the tokenizer: identical for both models.
    assert all(m["base"][s]["bytes"] == m["cpt"][s]["bytes"] for s in sources)
    # gain/forgetting are the pooled bpb differences, with the documented signs.
    def pooled(model, names):
        return sum(m[model][s]["nll_nats"] for s in names) / math.log(2) / sum(m[model][s]["bytes"] for s in names)
    vi, en = ["ntrex_vi", "heldout_vi"], ["ntrex_en", "heldout_en"]
    assert m["gain"]["vi"] == pytest.approx(pooled("base", vi) - pooled("cpt", vi), abs=1e-4)
    assert m["forgetting"]["en"] == pytest.approx(pooled("cpt", en) - pooled("base", en), abs=1e-4)
    assert set(m["gain"]) == {"vi"} and set(m["forgetting"]) == {"en"}
    assert m["gain"]["vi"] > 0  # the cpt fixture was trained on Vietnamese
    assert "xcopa" not in m  # XCOPA is a downstream task now (lm-eval; bench/results/downstream_xcopa_parity.json)
    assert m["overlap"]["shard_docs_checked"] >= 46 and m["overlap"]["eval_docs_in_train_shards"] == 0
    # every number carries its 95% interval: per source and per language, around the measured value
    for name in sources:
        entry = m["sources"][name]
        kind = "gain" if entry["domain"] == "new" else "forgetting"
        lo, hi = entry[f"{kind}_ci95"]
        assert lo <= entry[kind] <= hi and entry["units"] == m["base"][name]["docs"] > 1
        assert 1 <= entry["documents"] <= entry["units"]  # whole documents are what the bootstrap resamples
    assert m["bootstrap"]["unit"] == "document" and m["bootstrap"]["strata"] == "source"
    lo, hi = m["gain_ci95"]["vi"]
    assert lo <= m["gain"]["vi"] <= hi and hi - lo > 0
    lo, hi = m["forgetting_ci95"]["en"]
    assert lo <= m["forgetting"]["en"] <= hi
    gate = read_json(layout.metrics_file("gate"))  # the post-eval gate decided on those intervals
    assert gate["decision"] in ("promote", "refuse", "undecided") and set(gate["per_lang"]) == {"vi", "en"}
    assert set(gate["per_source"]) == sources
    out = layout.reports / "eval"
    report = (out / "report.md").read_text()
    assert "ntrex_vi" in report and "XCOPA" in report and "loss_curves.png" in report
    assert "> 0 = forgotten" in report and f"**Decision: {gate['decision']}**" in report  # cpt's one sign
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    samples = (out / "samples.md").read_text()
    assert samples.count("greedy:") == 4 and "Hà Nội là" in samples
    rows = (out / "bpb.csv").read_text().splitlines()
    assert rows[0] == "label,source,lang,domain,model,bpb" and len(rows) == 1 + 2 * len(sources)
    # the candidate's per-unit record (what the registry keeps); re-scoring the same model reproduces it unit by unit
    from cpt.evaluation import record
    from cpt.stages.eval import rescore

    cand = read_json(record.path(layout))
    assert set(cand) == sources and cand["heldout_en"]["documents"] == m["sources"]["heldout_en"]["documents"]
    again = rescore(params, layout, layout.model)
    assert record.matches(cand, again) == (True, "")
    assert again["ntrex_vi"]["units"]["nll"] == pytest.approx(cand["ntrex_vi"]["units"]["nll"], rel=1e-9)
    other = rescore({**params, "eval": {**params["eval"], "stride": 16}}, layout, layout.model)
    assert not record.matches(cand, other)[0]  # same text and bytes, another window: another measurement


def test_unknown_eval_key_and_bad_stride_are_config_errors(tmp_path):
    from cpt.stages.eval import config

    with pytest.raises(ConfigError, match=r"eval: unknown key 'strid' \(did you mean 'stride'\?\)"):
        config({"eval": {"strid": 3}})
    with pytest.raises(ConfigError, match="stride"):
        config({"eval": {"stride": 512, "max_length": 512}})
    with pytest.raises(ConfigError, match="eval: unknown key 'xcopa'"):  # moved to the downstream stage
        config({"eval": {"xcopa": {"langs": ["vi"]}}})


def test_eval_path_imports_without_the_data_and_ops_stack():
    from training_stack import run_without_data_and_ops_stack

    out = run_without_data_and_ops_stack(
        "import cpt.stages.eval, cpt.evaluation.report as r\n"
        "import pathlib, tempfile\n"
        "d = pathlib.Path(tempfile.mkdtemp())\n"
        "print(r.write_figure(d / 'x.png', {}, []))\n"
    )
    assert out.returncode == 0, out.stderr
    assert "matplotlib is not installed" in out.stdout


def test_params_yaml_eval_section_is_the_code_defaults(repo_root):
    from cpt.stages.eval import DEFAULTS, config
    from cpt.params import load_params

    assert config(load_params(repo_root / "params.yaml")) == DEFAULTS


def test_window_capped_by_the_model_keeps_the_stride_ratio(fixture_models):
    lm = load_model("base", fixture_models["base"], device="cpu")  # max_position_embeddings 256
    scorer = BpbScorer(lm, max_length=1024, stride=512)
    assert (scorer.max_length, scorer.stride) == (256, 128)
    assert (BpbScorer(lm, max_length=128, stride=100).max_length, BpbScorer(lm, 128, 100).stride) == (128, 100)


def test_one_unit_gets_no_interval_rather_than_a_zero_width_one():
    from cpt.evaluation.uncertainty import Paired, bootstrap, interval

    draws = bootstrap({"s": Paired([10.0], [9.0], [100])}, resamples=50, seed=0)
    assert interval(draws.values(), units=1) is None
    draws = bootstrap({"s": Paired([10.0, 30.0, 20.0], [9.0, 31.0, 15.0], [100, 120, 90])}, resamples=200, seed=0)
    lo, hi = interval(draws.values(), units=3)
    assert lo < hi and interval(draws.values(), units=3) == [lo, hi]  # seeded


def test_a_unit_budget_below_one_character_still_terminates():
    import signal

    from cpt.evaluation.sources import units

    def stuck(*_):
        raise TimeoutError("units() did not finish: an endless loop")

    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(5)
    try:
        for nbytes in (1, 2, 3):  # less than one 4-byte character: the old loop cut nothing, forever
            text = "a😀b 😀😀\nxy"
            pieces = units(text, nbytes)
            assert "".join(pieces) == text and all(pieces)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_units_remember_their_documents():
    from cpt.evaluation.sources import EvalSource, budget_units

    docs = ["".join(f"line {i} of {d}\n" for i in range(100)) for d in ("a", "b", "c")]
    texts, labels, pool = budget_units(docs, None, 3000, unit_bytes=300, seed=1, name="s")
    assert len(texts) == len(labels) and set(labels) <= {0, 1, 2} and len(set(labels)) > 1
    assert all(f"of {'abc'[d]}" in t for t, d in zip(texts, labels))  # each unit is labelled with its own document
    src = EvalSource("s", "en", "old", "heldout", texts, pool, docs=labels)
    assert src.documents == len(set(labels))
    assert EvalSource("t", "en", "old", "eval", ["x", "y"], 2).docs == [0, 1]  # no labels: each unit its document


def test_units_cut_long_documents_at_line_ends_and_the_budget_samples_them_spread_and_seeded():
    from cpt.evaluation.sources import budget, units

    book = "".join(f"line {i} " + "ư" * 40 + "\n" for i in range(200))  # ~90 bytes a line
    pieces = units(book, 1000)
    assert "".join(pieces) == book  # nothing lost: the units' bytes add up to the document's
    assert all(len(p.encode("utf-8")) <= 1000 for p in pieces) and all(p.endswith("\n") for p in pieces)
    assert units("short", 1000) == ["short"] and units(book, None) == [book]
    one_line = "từ " * 1000  # no newline at all (heldout_ko is one such 5 KB document): cut after a space
    assert "".join(units(one_line, 1000)) == one_line and len(units(one_line, 1000)) == 5  # 5,000 bytes
    docs = [book, "tiny doc", book.replace("line", "dòng")]
    chosen, pool = budget(docs, None, 5000, unit_bytes=1000, seed=1, name="src")
    assert pool == 2 * len(pieces) + 1 and sum(len(c.encode()) for c in chosen) <= 5000
    assert any("dòng" in c for c in chosen) and any("line" in c for c in chosen)  # spread, not a prefix
    assert budget(docs, None, 5000, unit_bytes=1000, seed=1, name="src") == (chosen, pool)  # seeded
    assert budget(docs, None, 5000, unit_bytes=1000, seed=2, name="src")[0] != chosen
    assert len(budget(docs, 3, None, unit_bytes=1000, seed=1, name="src")[0]) == 3
