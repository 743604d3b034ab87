"""A base configured like SmolLM2 (tests/gguf_fixtures.py: ``bos_token`` <|im_start|>, ``eos_token`` <|im_end|>, a
ChatML template, documents separated by <|endoftext|>): the codec never uses a chat marker as the document
separator or the scoring prefix, the tokenizer stage carries the base's chat template, and sft keeps it."""

from __future__ import annotations

import json
import shutil

import pytest

from cpt.errors import DataError
from cpt.tok.codec import TextCodec, is_chat_marker

from gguf_fixtures import CHATML, tiny_smollm_like
from tok_fixtures import make_clean, texts  # noqa: F401


@pytest.fixture(scope="module")
def smol_folder(tmp_path_factory):
    model, tokenizer = tiny_smollm_like()
    folder = tmp_path_factory.mktemp("smol")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_chat_marker_eos_and_bos_fall_back_to_the_pretraining_separator(smol_folder):
    cfg = json.loads((smol_folder / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")  # as SmolLM2's
    codec = TextCodec.from_folder(smol_folder)
    endoftext = codec.tok.token_to_id("<|endoftext|>")
    assert codec.bos_id is None and codec.eos_id == endoftext and codec.prefix_id == endoftext
    ids = codec.encode(["To be"])[0]
    assert codec.document(ids) == [*ids, endoftext]  # what the shards stage packs
    # an explicit shards.eos_token is taken as given
    assert TextCodec.from_folder(smol_folder, eos_token="<|im_end|>").eos_id == codec.tok.token_to_id("<|im_end|>")
    with pytest.raises(DataError, match="chat marker"):
        TextCodec.from_folder(smol_folder, add_bos=True)


def test_markers_are_found_without_the_template_and_plain_eos_is_kept(smol_folder, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(smol_folder, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert TextCodec.from_folder(bare).eos_id == 0  # <|im_end|> is a well-known turn marker
    # a tokenizer whose EOS is a real document end keeps it, even when its chat template names it
    cfg["eos_token"] = "<|endoftext|>"
    cfg["chat_template"] = "{{ messages[0]['content'] }}<|endoftext|>"
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert is_chat_marker("<|endoftext|>", cfg["chat_template"])
    assert TextCodec.from_folder(bare).eos_id == 0  # the only separator left is the EOS itself


def test_eval_scores_after_endoftext(smol_folder):
    from cpt.evaluation.models import load_model

    lm = load_model("base", smol_folder, device="cpu")
    assert lm.tokenizer.convert_ids_to_tokens(lm.prefix_id) == "<|endoftext|>"


@pytest.fixture(scope="module")
def extended(smol_folder, tmp_path_factory, texts):  # noqa: F811
    from cpt.stages import tokenizer as stage

    layout = make_clean(tmp_path_factory.mktemp("smol_tok"), texts, langs=("vi",))
    m = stage.run({"seed": 7, "tokenizer": {"base": str(smol_folder), "languages": ["vi"], "vocab_size": {"vi": 200},
                                            "max_train_chars": 60_000, "old_max_chars": 100_000,
                                            "check_lines": 50}}, layout)
    return layout, m


def test_tokenizer_stage_carries_the_chat_template_and_sft_keeps_it(extended):
    from transformers import AutoTokenizer

    from cpt.sft import template

    layout, m = extended
    assert m["chat_template"] is True and m["added"] > 0
    tok = AutoTokenizer.from_pretrained(layout.tokenizer)
    assert tok.chat_template == CHATML
    text, origin = template.choose_template(tok, "auto", None)
    assert (text, origin) == (CHATML, "model")
    chat = [{"role": "user", "content": "xin chào"}, {"role": "assistant", "content": "chào bạn"}]
    assert template.render(tok, chat).startswith("<|im_start|>user\nxin chào<|im_end|>")
    codec = TextCodec.from_folder(layout.tokenizer)  # what the shards stage reads
    assert codec.eos_id == tok.convert_tokens_to_ids("<|endoftext|>") and codec.bos_id is None


def test_tied_embeddings_new_rows_calibration_and_export(smol_folder, extended, tmp_path):
    """New rows of a tied model: one matrix, old rows untouched, each new row the mean of its byte-level pieces'
    rows; calibration is skipped (it would move the input rows) and says so; the export reloads still tied."""
    import torch
    from transformers import AutoModelForCausalLM

    from cpt.training.embeddings import calibrate_new_logits, extend_embeddings

    layout, m = extended
    new_tokens = json.loads((layout.tokenizer / "new_tokens.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.float32)
    old = model.get_input_embeddings().weight.detach().clone()
    report = extend_embeddings(model, new_tokens)
    emb = model.get_input_embeddings().weight
    assert report["tied"] and model.get_output_embeddings().weight is emb
    assert emb.shape[0] % 64 == 0 and emb.shape[0] >= new_tokens["vocab"]
    assert torch.equal(emb[: old.shape[0]], old)
    for a in new_tokens["added"][:20]:
        torch.testing.assert_close(emb[a["id"]], old[a["base_ids"]].mean(0))
    blocks = torch.tensor([[1, 2, 3, 4] * 4])
    cal = calibrate_new_logits(model, blocks, new_tokens["base_vocab"], 0.01)
    assert cal["new_logit_shift"] == 0.0 and "tied" in cal["calibration_skipped"]
    model.save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert back.get_output_embeddings().weight is back.get_input_embeddings().weight
    torch.testing.assert_close(back.get_input_embeddings().weight, emb, rtol=0, atol=0)
