"""One text -> ids rule for shards, eval, XCOPA and the overlap check (cpt.tok.codec).

The failure this guards against: WikiText-2 spells unknown words as the literal ``<unk>`` (2,224 times in the test
set). The shards stage encodes such strings as text; an eval that lets the HF tokenizer turn them into the special
id 0 scores targets the model never trained on (the demo's largest "forgetting"), and an overlap check that does the
same can never find a WikiText article inside the training shards.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from cpt.data.records import SourceInfo, write_manifest
from cpt.io import write_jsonl
from cpt.layout import Layout

LITERALS = "The <unk> river , <s> a tag </s> and <|endoftext|> in running text .\n"


def _tokenizer_folder(folder: Path, texts: list[str]) -> Path:
    """A Llama-style byte-level BPE folder: <unk> <s> </s> <|endoftext|> special, BOS prepended by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|endoftext|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 additional_special_tokens=["<|endoftext|>"])
    hf.save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=len(hf), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _clean(layout: Layout, sources: dict[str, tuple[str, str, str, list[str]]]) -> None:
    layout.clean.mkdir(parents=True, exist_ok=True)
    infos = []
    for name, (lang, domain, role, texts) in sources.items():
        rows = [dict(id=f"{name}/{i}", source=name, lang=lang, domain=domain, role=role, text=t)
                for i, t in enumerate(texts)]
        write_jsonl(layout.clean / f"{name}.jsonl", rows)
        infos.append(SourceInfo(name, lang, domain, role, f"{name}.jsonl", len(rows)))
    write_manifest(layout.clean, infos)


def _wikitext_article(corpora: Path) -> str:
    """The first WikiText-2 test article with a literal <unk> (as ingest's `unit: wikitext` cuts them)."""
    lines = (corpora / "en_wikitext2" / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.startswith(" = ") and not ln.startswith(" = = ")]
    for a, b in itertools.pairwise(starts + [len(lines)]):
        text = "".join(lines[a:b]).strip()
        if "<unk>" in text:
            return text
    raise AssertionError("no WikiText article with <unk>")


def _stream(layout: Layout, name: str) -> np.ndarray:
    meta = json.loads((layout.shards / "meta.json").read_text())
    return np.fromfile(layout.shards / f"{name}.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"))


def test_eval_encodes_special_token_literals_exactly_as_the_shards(tmp_path, corpora, one_torch_thread):
    from cpt.evaluation.bpb import BpbScorer
    from cpt.evaluation.models import load_model
    from cpt.stages import shards

    article = _wikitext_article(corpora)
    text = LITERALS + article[:1500]
    filler = article[1500:6000]  # a second document, so the first is whole in the written blocks
    folder = _tokenizer_folder(tmp_path / "tok", [article, LITERALS])
    layout = Layout(tmp_path / "proj")
    _clean(layout, {"wiki": ("en", "old", "train", [text, filler])})
    shards.run({"seed": 0, "shards": {"tokenizer": str(folder), "block_size": 16, "val_fraction": 0.0}}, layout)
    stream = _stream(layout, "old/train").tolist()

    lm = load_model("cpt", folder)
    seq = [lm.prefix_id, *lm.encode([text])[0]]
    assert seq == stream[: len(seq)]  # [BOS] + the same ids, special-token strings spelled as text
    assert stream[len(seq)] == 2  # then the shards' EOS
    for special in ("<unk>", "<s>", "</s>", "<|endoftext|>"):
        assert lm.tokenizer.convert_tokens_to_ids(special) not in seq[1:]
    # the scorer conditions on the same prefix and scores exactly these targets
    scorer = BpbScorer(lm, max_length=64, stride=48)
    (nll, n), = scorer.doc_nll([text])
    assert n == len(seq) - 1 and np.isfinite(nll)


def test_a_wikitext_article_planted_in_the_training_shards_is_found(tmp_path, corpora, one_torch_thread):
    from cpt.evaluation.overlap import check_overlap
    from cpt.stages import shards
    from cpt.stages.eval import config

    article = _wikitext_article(corpora)
    folder = _tokenizer_folder(tmp_path / "tok", [article])
    layout = Layout(tmp_path / "proj")
    books = [article[i : i + 3000].replace("<unk>", "x") + " filler" for i in range(0, 9000, 3000)]
    vi = ("vi", "new", "train", ["Hà Nội là thủ đô của Việt Nam. " * 20])
    _clean(layout, {"vi": vi, "books": ("en", "old", "train", books), "en_wikitext2": ("en", "old", "eval", [article])})
    shards.run({"seed": 0, "shards": {"tokenizer": str(folder), "block_size": 16, "val_fraction": 0.0}}, layout)
    cfg = config({"eval": {"heldout": None}})
    assert check_overlap(layout, cfg)["eval_docs_in_train_shards"] == 0

    # the article reaches the shards behind the records' back (a barrier broken after clean): only the token-id
    # lookup can see it, and it must, although the article is full of literal <unk>
    _clean(layout, {"vi": vi, "books": ("en", "old", "train", books[:1] + [article] + books[1:])})
    shards.run({"seed": 0, "shards": {"tokenizer": str(folder), "block_size": 16, "val_fraction": 0.0}}, layout)
    _clean(layout, {"vi": vi, "books": ("en", "old", "train", books), "en_wikitext2": ("en", "old", "eval", [article])})
    result = check_overlap(layout, {**cfg, "overlap": {**cfg["overlap"], "fail": False}})
    assert result["eval_docs_in_train_shards"] == 1
