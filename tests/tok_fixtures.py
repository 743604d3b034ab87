"""Shared inputs of the tokenizer tests: real text sliced from ../shared/corpora, and the bases (Mistral v1's real
tokenizer.model from the installed mistral_common package, a SentencePiece BPE and a byte-level BPE trained here on
English)."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from cpt.data.records import SourceInfo, write_manifest
from cpt.io import write_jsonl
from cpt.layout import Layout

FIVE = ("en", "vi", "zh", "ja", "ko")


def _json_lines(path: Path, limit_chars: int, field: str = "text") -> list[str]:
    out, n = [], 0
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)[field]
            out.append(text[: limit_chars - n])
            n += len(out[-1])
            if n >= limit_chars:
                break
    return out


@pytest.fixture(scope="session")
def texts(corpora: Path) -> dict[str, list[str]]:
    nt = corpora / "ntrex128"
    ev = {
        "en": "newstest2019-src.eng.txt", "vi": "newstest2019-ref.vie.txt", "zh": "newstest2019-ref.zho-CN.txt",
        "ja": "newstest2019-ref.jpn.txt", "ko": "newstest2019-ref.kor.txt",
    }
    out = {f"eval_{k}": (nt / v).read_text(encoding="utf-8").splitlines()[:300] for k, v in ev.items()}
    out["train_vi"] = _json_lines(corpora / "viwiki/viwiki.jsonl.gz", 1_500_000)
    out["train_en"] = _json_lines(corpora / "en_gutenberg/en_gutenberg_books.jsonl.gz", 3_000_000)
    out["train_zh"] = _json_lines(corpora / "zh_cmrc2018_contexts/cmrc2018_contexts.jsonl", 300_000)
    out["train_ja"] = _json_lines(corpora / "ja_jsquad_contexts/jsquad_v1.3_contexts.jsonl", 300_000)
    out["train_ko"] = _json_lines(corpora / "ko_ud_kaist/ko_kaist_dev_test_docs.jsonl", 300_000)
    return out


def make_clean(root: Path, texts: dict[str, list[str]], langs=("vi", "zh", "ja", "ko")) -> Layout:
    """A data/clean folder as the clean stage writes it: document records + manifest."""
    layout = Layout(root)
    sources = []

    def add(name, lang, domain, role, docs):
        rows = [{"id": f"{name}/{i}", "source": name, "lang": lang, "domain": domain, "role": role, "text": t}
                for i, t in enumerate(docs) if t.strip()]
        write_jsonl(layout.clean / f"{name}.jsonl", rows)
        sources.append(SourceInfo(name=name, lang=lang, domain=domain, role=role, file=f"{name}.jsonl", docs=len(rows)))

    for lang in langs:
        add(f"train_{lang}", lang, "new", "train", texts[f"train_{lang}"])
    add("train_en", "en", "old", "train", texts["train_en"])
    for lang in FIVE:
        add(f"eval_{lang}", lang, "old" if lang == "en" else "new", "eval", texts[f"eval_{lang}"])
    write_manifest(layout.clean, sources)
    return layout


@pytest.fixture(scope="session")
def mistral_model(tmp_path_factory) -> Path:
    import mistral_common

    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    folder = tmp_path_factory.mktemp("mistral_v1")
    shutil.copy(src, folder / "tokenizer.model")  # transformers 5 wants the name tokenizer.model (stack.md trap 8)
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def english_spm(tmp_path_factory, texts) -> Path:
    """A small Llama-style SentencePiece BPE trained on English: byte fallback, identity normaliser, <unk>=0,
    <s>=1, </s>=2 -- the shape of the builtin tiny base."""
    folder = tmp_path_factory.mktemp("english_spm")
    lines = [ln for doc in texts["train_en"] for ln in doc.split("\n") if ln.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=2000, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2,
        input_sentence_size=20000, shuffle_input_sentence=True,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "chat_template": "{{ messages }}"}))
    return folder


@pytest.fixture(scope="session")
def byte_bpe(tmp_path_factory, texts) -> Path:
    """A GPT-2-style byte-level BPE tokenizer.json trained on English with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    folder = tmp_path_factory.mktemp("byte_bpe")
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [ln for doc in texts["train_en"] for ln in doc.split("\n") if ln.strip()][:20000]
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # added tokens outside the model vocab, as in Llama-3
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    return folder


def params(base: Path, **over) -> dict:
    sec = {"base": str(base), "vocab_size": {"vi": 1500, "zh": 800, "ja": 800, "ko": 800},
           "max_train_chars": 1_000_000, "check_lines": 300}
    sec.update(over)
    return {"seed": 7, "tokenizer": sec}
