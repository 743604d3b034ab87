"""Stage sft: instruction formats, assistant-only masking (token by token), the chat template round trip, packing
boundaries, exact resume, and the exported folder in plain transformers."""

from __future__ import annotations

import gzip
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from sft_fixture import make_project, params

CONV = [
    {"role": "system", "content": "Bạn là trợ lý."},
    {"role": "user", "content": "Ba màu chính là gì?"},
    {"role": "assistant", "content": "Đỏ, xanh và vàng."},
    {"role": "user", "content": "Name one more."},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture(scope="module")
def project(tmp_path_factory, corpora, one_torch_thread) -> Path:
    return make_project(tmp_path_factory.mktemp("sft"), corpora)


@pytest.fixture(scope="module")
def chat_tok(project, tmp_path_factory):
    from cpt.sft.pipeline import chat_tokenizer

    tok, text, origin = chat_tokenizer(project / "data" / "models" / "cpt", "auto", tmp_path_factory.mktemp("tok"))
    assert origin == "default"
    return tok


@pytest.fixture(scope="module")
def trained(project):
    from cpt.cli import run_stage
    from cpt.layout import Layout

    metrics = run_stage("sft", params(project), Layout(project))
    return project, metrics


def test_masking_token_by_token(chat_tok):
    """Exactly the assistant replies and the EOS closing each are trained on; system, user and the [INST] markers
    are not. Checked per token against the text, and against transformers' own {% generation %} mask."""
    from cpt.sft.template import IGNORE, encode

    enc = encode(chat_tok, [CONV])[0]
    trained_text = chat_tok.decode([i for i, lab in zip(enc.ids, enc.labels) if lab != IGNORE])
    assert trained_text == " Đỏ, xanh và vàng.</s> Green.</s>"
    prompt_text = chat_tok.decode([i for i, lab in zip(enc.ids, enc.labels) if lab == IGNORE])
    assert prompt_text == "<s>[INST] <<SYS>>\nBạn là trợ lý.\n<</SYS>>\n\nBa màu chính là gì? [/INST][INST] Name one more. [/INST]"
    for i, lab in zip(enc.ids, enc.labels):
        assert lab in (i, IGNORE)
    ref = chat_tok.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ref["input_ids"] == enc.ids
    assert ref["assistant_masks"] == [int(lab != IGNORE) for lab in enc.labels]
    assert enc.assistant_bytes == len(" Đỏ, xanh và vàng. Green.".encode())


def test_model_own_template_is_used_and_masked(chat_tok):
    """A model that ships a chat template keeps it (here ChatML, no {% generation %} markers): the assistant span
    comes from rendering prefixes, so the mask is right for any prefix-stable template."""
    import copy

    from cpt.sft.template import IGNORE, choose_template, encode

    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tok = copy.deepcopy(chat_tok)
    tok.chat_template = chatml
    assert choose_template(tok, "auto") == (chatml, "model")
    enc = encode(tok, [CONV])[0]
    trained_text = tok.decode([i for i, lab in zip(enc.ids, enc.labels) if lab != IGNORE])
    assert trained_text == "Đỏ, xanh và vàng.<|im_end|>\nGreen.<|im_end|>\n"


def test_formats_and_cleaning(tmp_path):
    from cpt.sft import data

    f = tmp_path / "mixed.jsonl"
    nfd = unicodedata.normalize("NFD", "Thủ đô của Việt Nam là gì?")
    rows = [
        json.dumps({"instruction": nfd, "input": "", "output": "Hà Nội."}),
        "{not json",
        json.dumps({"prompt": "Hi", "response": ""}),
        json.dumps({"messages": [{"role": "user", "content": "A"}, {"role": "user", "content": "B"}]}),
        json.dumps({"conversations": [{"from": "human", "value": "Say [/INST] now"}, {"from": "gpt", "value": "x"}]}),
        json.dumps({"conversations": [{"from": "human", "value": "Xin chào"}, {"from": "gpt", "value": "Chào  bạn\t!"}]}),
        json.dumps({"instruction": "Thủ đô của Việt Nam là gì?", "output": "Hà Nội."}),  # exact duplicate after NFC
        json.dumps({"foo": 1}),
    ]
    f.write_text("\n".join(rows) + "\n", encoding="utf-8")
    srcs = data.check_sources([{"name": "m", "path": str(f), "lang": "vi"}], tmp_path)
    prep = data.prepare(srcs, seed=1, eval_fraction=0.0, max_eval=None, forbidden=("</s>", "[/INST]"),
                        clean_dir=None, decontam={"enabled": True})
    reasons = {(q["line"], q["reason"]) for q in prep.quarantine}
    assert reasons == {(2, "bad_json"), (3, "empty"), (4, "bad_roles"), (5, "marker"), (7, "exact_duplicate"),
                       (8, "unknown_format")}
    assert all(q["file"] == str(f) for q in prep.quarantine)
    kept = {ex["line"]: ex["messages"] for ex in prep.examples}
    assert kept[1][0]["content"] == "Thủ đô của Việt Nam là gì?" and unicodedata.is_normalized("NFC", kept[1][0]["content"])
    assert kept[6] == [{"role": "user", "content": "Xin chào"}, {"role": "assistant", "content": "Chào bạn !"}]
    # held-out by instruction: the same instruction with another answer lands on the same side
    assert data.in_eval("thủ đô?", 3, 0.5) == data.in_eval("thủ đô?", 3, 0.5)
    with pytest.raises(Exception, match="sft.sources\\[0\\].*not found"):
        data.check_sources([{"name": "x", "path": "missing.jsonl", "lang": "vi"}], tmp_path)


def test_near_copies_of_short_held_out_items_are_dropped_from_training():
    """Issue 24 point 10: a held-out item shorter than one 13-word n-gram was matched by its exact text only."""
    from cpt.sft import data

    def ex(i, role, user, reply):
        return {"id": f"v/{i}", "source": "v", "lang": "vi", "domain": "new", "line": i, "role": role,
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}

    prep = data.Prepared(examples=[
        ex(1, "eval", "Thủ đô của Việt Nam là gì?", "Hà Nội."),
        ex(2, "train", "thủ đô của Việt Nam là gì", "Hà Nội"),  # the same item, other case and punctuation
        ex(3, "train", "Câu hỏi ôn tập", "Thủ đô của Việt Nam là gì? Hà Nội. Còn Lào thì Viêng Chăn."),  # inside
        ex(4, "train", "Thủ đô của Việt Nam là gì ?", "Thành phố Hà Nội, từ năm 1976."),  # the instruction, reworded
        ex(5, "train", "Thủ đô của Thái Lan là gì?", "Băng Cốc."),  # another question: kept
        ex(6, "train", "Hà Nội", "Một thành phố."),  # shares two words only: kept
    ], stats={"v": {}})
    data._decontaminate(prep, [{"name": "v", "file": "v.jsonl"}], None, {"enabled": True})
    assert [e["id"] for e in prep.examples] == ["v/1", "v/5", "v/6"]
    assert {q["id"]: (q["reason"], q["ref"]) for q in prep.quarantine} == {
        "v/2": ("contaminated", "v/1"), "v/3": ("contaminated", "v/1"), "v/4": ("contaminated", "v/1")}


def test_packing_plan_and_boundaries(chat_tok, project):
    """Best-fit rows hold every example once within capacity; a conversation's per-token losses in a packed row
    equal its losses alone (attention never crosses examples), and differ when positions do not restart."""
    from transformers import AutoModelForCausalLM

    from cpt.sft.packing import pack, plan
    from cpt.sft.template import encode
    from cpt.training.loss import CausalLMLoss

    lengths = [5, 9, 3, 7, 7, 1, 10, 2]
    rows = plan(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows) and len(rows) == 5

    a, b = encode(chat_tok, [CONV[1:3], CONV[3:]])
    length = len(a.ids) + len(b.ids)
    both = pack("ab", [a, b], length, chat_tok.eos_token_id)
    alone = pack("b", [b], length, chat_tok.eos_token_id)
    assert both.n_blocks == 1 and alone.n_blocks == 1
    model = AutoModelForCausalLM.from_pretrained(project / "data" / "models" / "cpt", dtype=torch.float32).eval()
    core = CausalLMLoss(model)
    x, y, pos = (t for t in both.rows([0])[0])
    start = len(a.ids) - 1  # b's first position in the packed row
    n = len(b.ids) - 1
    assert pos[start].item() == 0 and y[start - 1].item() != -100  # a's EOS target right before the boundary
    with torch.no_grad():
        _, packed = core(x[None], y[None], pos[None])
        xb, yb, pb = (t for t in alone.rows([0])[0])
        _, single = core(xb[None], yb[None], pb[None])
        _, crossing = core(x[None], y[None], torch.arange(length - 1 + 1)[None, : x.shape[0]])
    torch.testing.assert_close(packed[0, start : start + n], single[0, :n], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(crossing[0, start : start + n], single[0, :n], atol=1e-3)
    assert (packed[0, y == -100] == 0).all()


def test_conversation_nll_per_unit(chat_tok, project):
    """The gate's resampling unit: each held-out conversation's assistant NLL read from the packed rows (spans)
    equals that conversation scored alone, and the units' bytes add up to the split's."""
    from cpt.evaluation.models import load_model
    from cpt.sft.intervals import conversation_nll
    from cpt.sft.packing import pack
    from cpt.sft.template import encode

    convs = [CONV[1:3], CONV[3:], CONV, CONV[:3], CONV[1:]]
    enc = encode(chat_tok, convs)
    split = pack("x", enc, 128, chat_tok.eos_token_id)
    assert split.n_blocks < len(convs) and len(split.spans) == len(convs)
    assert split.spans[:, 3].sum() == split.target_bytes
    lm = load_model("cpt", project / "data" / "models" / "cpt", device="cpu")
    packed = conversation_nll(lm, split, micro_batch=2)
    for k, (row, start, end, nbytes) in enumerate(split.spans):
        i = next(j for j, e in enumerate(enc) if len(e.ids) - 1 == end - start
                 and np.array_equal(split.data[row, 0, start:end], e.ids[:-1]))
        alone = conversation_nll(lm, pack("one", [enc[i]], 128, chat_tok.eos_token_id), micro_batch=1)
        assert nbytes == enc[i].assistant_bytes
        assert packed[k] == pytest.approx(alone[0], rel=1e-5)


def test_sft_gate_decides_on_intervals():
    """Per-unit scores -> paired bootstrap -> the gate: a clear assistant gain with no forgetting promotes, a clear
    plain-text regression refuses (never "undecided: no interval"); intervals are seeded and cover the estimate."""
    from cpt.evaluation.uncertainty import Paired
    from cpt.ops import gate
    from cpt.sft.intervals import Group, gate_inputs, summarize

    rng = np.random.default_rng(0)
    nbytes = rng.integers(200, 400, 60).astype(float)
    cpt_vi = nbytes * 2.0 * (1 + 0.1 * rng.standard_normal(60))  # nats: ~2.9 bpb
    cpt_en = nbytes * 1.0 * (1 + 0.1 * rng.standard_normal(60))

    def strata(en_cost: float) -> list:
        return [Group("sft_heldout_vi", "vi", "new", "assistant", Paired(cpt_vi, cpt_vi * 0.7, nbytes)),
                Group("sft_heldout_en", "en", "old", "assistant", Paired(cpt_en, cpt_en * 0.9, nbytes)),
                Group("ntrex_vi", "vi", "new", "plain", Paired(cpt_vi, cpt_vi * 1.5, nbytes)),
                Group("en_wikitext2", "en", "old", "plain", Paired(cpt_en, cpt_en * en_cost, nbytes))]

    params = {"gate": {"min_gain": 0.02, "max_forgetting": 0.05}}
    good = strata(1.0)
    summary = summarize(good, resamples=200, seed=3)
    assert summary == summarize(good, resamples=200, seed=3)
    lo, hi = summary["gain_ci95"]["vi"]
    assert lo < summary["gain"]["vi"] < hi and summary["forgetting_ci95"]["en"][0] <= 0 <= summary["forgetting_ci95"]["en"][1]
    assert set(summary["gate"]["gain"]) == {"vi"} and set(summary["gate"]["forgetting"]) == {"en"}
    eval_like = gate_inputs(summary, good)
    assert set(eval_like["cpt"]) == {"sft_heldout_vi", "en_wikitext2"}  # new-domain chat, old-domain plain text
    decision = gate.decide(eval_like, params)
    assert decision["decision"] == "promote", decision["reason"]
    assert decision["per_source"]["sft_heldout_vi"]["ci95"] == summary["gain_ci95"]["vi"]
    bad = strata(1.2)  # +20% NLL on English plain text: ~0.29 bpb forgotten
    decision = gate.decide(gate_inputs(summarize(bad, resamples=200, seed=3), bad), params)
    assert decision["decision"] == "refuse" and "en_wikitext2" in decision["reason"], decision["reason"]


def test_stage_exports_a_chat_model(trained):
    """The folder loads in plain transformers with chat_template set; apply_chat_template reproduces the training
    ids; the prompt is a prefix of the training ids; generate runs through the template; metrics are complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.sft.template import encode

    root, m = trained
    out = root / "data" / "models" / "sft"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.chat_template and "[INST]" in tok.chat_template
    train_rows = [json.loads(line) for line in (root / "data" / "sft" / "train.jsonl").read_text().splitlines()]
    for conv in [CONV] + [r["messages"] for r in train_rows[:5]]:
        assert tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"] == encode(tok, [conv])[0].ids
        prompt = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert encode(tok, [conv])[0].ids[: len(prompt["input_ids"])] == prompt["input_ids"]
    ids = tok.apply_chat_template([{"role": "user", "content": "Xin chào"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
    assert set(m["assistant"]) == {"vi", "en"} and m["assistant"]["vi"]["sft_loss"] < m["assistant"]["vi"]["cpt_loss"]
    assert m["data"]["vi"]["contaminated"] == 1  # the fixture's planted eval sentence
    assert "vi" in m["forgetting"] and m["gate"]["vs_base"]["gain"] is not None
    # the gate decides on paired bootstrap intervals (per held-out conversation / per plain-text unit)
    assert m["gate"]["decision"] in ("promote", "refuse"), m["gate"]["reason"]
    assert m["gate"]["per_lang"]["vi"]["ci95"] == m["gain_ci95"]["vi"] and len(m["gain_ci95"]["vi"]) == 2
    assert m["forgetting_ci95"] == {"vi": None}  # one plain-text unit (the fixture's ntrex_vi): no interval
    assert m["sources"]["sft_heldout_vi"]["units"] == m["assistant"]["vi"]["examples"]
    assert m["sources"]["sft_heldout_vi"]["cpt_bpb"] == pytest.approx(m["assistant"]["vi"]["cpt_bpb"], rel=1e-4)
    assert (root / "reports" / "sft" / "samples.md").read_text().count("**greedy:**") == 2
    eval_ids = {json.loads(line)["id"] for line in (root / "data" / "sft" / "eval.jsonl").read_text().splitlines()}
    assert eval_ids and not eval_ids & {r["id"] for r in train_rows}


def test_sft_champion_is_rescored_on_the_candidates_conversations_and_its_copy_deleted(trained, tmp_path):
    """Issue 24 point 5: the sft gate re-scores a champion judged on other units (it used to refuse every later
    candidate forever): the re-scorer reproduces the candidate's own record unit by unit, and the gate pairs a
    downloaded champion (here the CPT model) with the candidate, then deletes the copy."""
    import shutil

    from transformers import AutoTokenizer

    from cpt.evaluation import record
    from cpt.layout import Layout
    from cpt.ops import tracking
    from cpt.sft import evaluate as sft_eval
    from cpt.sft import records
    from cpt.sft.intervals import gate_inputs, summarize
    from cpt.sft.packing import pack
    from cpt.sft.template import encode
    from cpt.stages.sft import config

    root, _ = trained
    p = params(root)
    cfg, layout, out = config(p), Layout(root), root / "data" / "models" / "sft"
    tok = AutoTokenizer.from_pretrained(out)
    rows = [json.loads(line) for line in (root / "data" / "sft" / "eval.jsonl").read_text().splitlines()]
    exs = [r for r in rows if r["lang"] == "vi"]
    enc = encode(tok, [e["messages"] for e in exs])
    exs, enc = zip(*[(x, e) for x, e in zip(exs, enc) if len(e.ids) - 1 <= cfg["max_length"]])
    heldout = {"vi": (list(exs), list(enc))}
    split = pack("eval/vi", list(enc), cfg["max_length"], tok.eos_token_id)
    scored = sft_eval.score_models(layout, cfg["plain_eval"], out, out, "cpu", seed=7, eval_splits={"vi": split},
                                   micro_batch=4)
    cand = records.candidate(cfg, heldout, scored, {"vi": "new"})
    assert set(cand) == {"sft_heldout_vi"} and cand["sft_heldout_vi"]["documents"] == len(exs)
    again = records.rescorer(layout, cfg, 7, heldout, {"vi": "new"})(out)
    assert record.matches(cand, again) == (True, "")
    assert again["sft_heldout_vi"]["units"]["nll"] == pytest.approx(cand["sft_heldout_vi"]["units"]["nll"], rel=1e-6)

    copy = tmp_path / "cpt-champion-v1-abc" / "model"

    class Registry(tracking.Tracker):
        active, model_name = True, "cpt"

        def get_alias(self, name, alias):  # a champion judged on other conversations (an older record)
            return {"version": "1", "run_id": "r", "sources": {"sft_heldout_vi": {"domain": "new", "bpb": 1.0}}}

        def download_model(self, champion):
            shutil.copytree(root / "data" / "models" / "cpt", copy)
            return copy

        def register_model(self, path, tags=None, **kwargs):
            return "2"

    strata = sft_eval.groups(scored, {"vi": split}, {"vi": "new"})
    d = sft_eval.apply_gate(p, cfg["gate"], gate_inputs(summarize(strata, resamples=200, seed=7), strata), Registry(),
                            out, "cpt-sft", candidate=cand, rescore=records.rescorer(layout, cfg, 7, heldout, {"vi": "new"}))
    c = d["vs_champion"]
    assert c["checked"] and c["how"] == "re-scored on this eval set", d["reason"]
    assert set(c["per_source"]) == {"sft_heldout_vi"} and c["per_source"]["sft_heldout_vi"]["documents"] == len(exs)
    assert not copy.parent.exists()  # the downloaded champion is deleted after use


def test_resume_is_exact(trained, tmp_path, monkeypatch):
    """A run killed after its step-4 checkpoint and resumed ends with the uninterrupted run's weights and curve,
    bit for bit (CPU); a finished run is re-exported, not retrained."""
    import shutil

    from safetensors.torch import load_file

    from cpt.cli import run_stage
    from cpt.layout import Layout
    from cpt.sft import loop

    root, full = trained
    proj = tmp_path / "p"
    shutil.copytree(root / "data" / "models", proj / "data" / "models")
    shutil.copytree(root / "data" / "clean", proj / "data" / "clean")
    shutil.copytree(root / "instr", proj / "instr")
    real_step, calls = loop.train_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    p = params(root)
    monkeypatch.setattr(loop, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_stage("sft", p, Layout(proj))
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = run_stage("sft", p, Layout(proj))
    assert resumed["train"]["resumed_from"] == 4
    assert resumed["curve"] == full["curve"]
    a = load_file(root / "data" / "models" / "sft" / "model.safetensors")
    b = load_file(proj / "data" / "models" / "sft" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = run_stage("sft", p, Layout(proj))
    assert again["train"]["retrained"] is False and again["curve"] == full["curve"]


def test_fused_loss_ignores_masked_targets():
    """train's fused chunked loss with -100 targets: the same loss and gradients as torch's cross-entropy with
    ignore_index, and exactly 0 for the ignored tokens (sft's prompt side)."""
    import torch.nn.functional as F

    from cpt.training.loss import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 20, (10,))
    t[[0, 3, 4, 9]] = -100
    total, losses = linear_cross_entropy(h, w, t, chunk_size=4)
    total.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.t(), t, ignore_index=-100, reduction="sum")
    ref.backward()
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=1e-5)  # the fused path takes logits in fp32
    assert (losses[[0, 3, 4, 9]] == 0).all()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)


SFT_WORKER = """
import json, os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
import cpt.stages.sft
from cpt.layout import Layout
metrics = cpt.stages.sft.run(json.loads(os.environ["PARAMS"]), Layout(sys.argv[1]))
if dist.get_rank() == 0:
    with open(os.path.join(sys.argv[1], "curve.json"), "w") as fh:
        json.dump(metrics["curve"], fh)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(trained, tmp_path):
    """DDP over 2 processes x 2 rows = 1 process x 4 rows: same training losses and weights within float tolerance,
    although the ranks hold different numbers of assistant tokens (the loss is the global per-token mean)."""
    import os
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    root, full = trained
    proj = tmp_path / "multi"
    for sub in ("models/cpt", "clean"):
        shutil.copytree(root / "data" / sub, proj / "data" / sub)
    p = params(root, micro_batch=2)
    script = tmp_path / "worker.py"
    script.write_text(SFT_WORKER)
    env = {**os.environ, "PARAMS": json.dumps(p), "CPT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(proj)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads((proj / "curve.json").read_text())
    ref = [r["train_loss"] for r in full["curve"][1:]]
    assert [r["train_loss"] for r in curve[1:]] == pytest.approx(ref, rel=1e-5)
    a = load_file(root / "data" / "models" / "sft" / "model.safetensors")
    b = load_file(proj / "data" / "models" / "sft" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_sft_lora_trains_only_the_adapter_and_exports_merged(trained, tmp_path):
    """sft.method=lora: only LoRA trains (sft adds no tokens, so the vocabulary matrices stay the CPT model's, bit
    for bit); data/models/sft is a merged plain HF folder with adapter/ inside; the gate still decides."""
    import shutil

    from safetensors.torch import load_file

    from cpt.cli import run_stage
    from cpt.layout import Layout

    root, _ = trained
    proj = tmp_path / "p"
    for sub in ("data/models", "data/clean", "instr"):
        shutil.copytree(root / sub, proj / sub)
    shutil.rmtree(proj / "data" / "models" / "sft", ignore_errors=True)
    m = run_stage("sft", params(root, method="lora", lora_rank=4), Layout(proj))
    cpt = load_file(proj / "data" / "models" / "cpt" / "model.safetensors")
    sft = load_file(proj / "data" / "models" / "sft" / "model.safetensors")
    assert cpt.keys() == sft.keys()
    vocab = [k for k in cpt if "embed_tokens" in k or k.startswith("lm_head")]
    assert vocab and all(torch.equal(cpt[k], sft[k]) for k in vocab)
    assert not torch.equal(cpt["model.layers.0.mlp.down_proj.weight"], sft["model.layers.0.mlp.down_proj.weight"])
    adapter = load_file(proj / "data" / "models" / "sft" / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert m["assistant"]["vi"]["sft_loss"] < m["assistant"]["vi"]["cpt_loss"]
    assert m["gate"]["decision"] in ("promote", "refuse")
