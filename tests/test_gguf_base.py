"""`cpt base` from a GGUF file: a tiny SmolLM2-like Llama written as GGUF (tests/gguf_fixtures.py) round-trips to a
plain HF folder (safetensors, tokenizer.json, chat template, no quantization_config) with equal logits."""

from __future__ import annotations

import json

import pytest
import torch

from cpt.errors import ConfigError
from cpt.layout import Layout
from cpt.stages import base

pytest.importorskip("gguf")
from gguf_fixtures import tiny_smollm_like, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model, tokenizer = tiny_smollm_like()
    (root / "models").mkdir()
    write_gguf(model, tokenizer, root / "models" / "tiny.gguf")
    layout = Layout(root)
    metrics = base.run({"base": {"model": "models/tiny.gguf"}}, layout)  # relative to the project root
    return layout, metrics, model, tokenizer


def test_gguf_becomes_a_plain_hf_folder(converted):
    layout, metrics, _, _ = converted
    names = {p.name for p in layout.base.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "config.json", "cpt_base.json"} <= names
    config = json.loads((layout.base / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True and config["dtype"] == "float32"
    assert metrics["format"] == "gguf" and metrics["tied_embeddings"] and metrics["chat_template"]
    assert metrics["vocab_size"] == metrics["tokenizer_size"]


def test_round_trip_logits_and_tokenizer_are_equal(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    layout, _, model, tokenizer = converted
    loaded = AutoModelForCausalLM.from_pretrained(layout.base).eval()  # plain load: no gguf_file, no quantizer
    tok = AutoTokenizer.from_pretrained(layout.base)
    assert getattr(loaded, "hf_quantizer", None) is None
    text = "It was the best of fox, 42 shells <|endoftext|> To be"
    assert tok.encode(text) == tokenizer.encode(text)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_missing_gguf_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="GGUF file .*missing.gguf does not exist"):
        base.run({"base": {"model": "missing.gguf"}}, Layout(tmp_path))
