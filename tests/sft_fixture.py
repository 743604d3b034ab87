"""A micro project for the sft tests, built without the upstream stages:

- data/models/cpt: a random 2-layer LlamaForCausalLM + a byte-level BPE (with <unk>, <s>, </s>) trained on a few KB
  of real English and Vietnamese text (en_gutenberg, viwiki), no chat template (so the default one is used);
- data/clean: a manifest with one role: eval source (decontamination);
- instr/: small instruction files in each supported format, real text from vi_alpaca and alpaca_demo.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

VI_ALPACA = "vi_alpaca/vi_alpaca_reduced.jsonl.gz"
EN_ALPACA = "alpaca_demo/alpaca_en_demo.json"


def _lines(path: Path, n: int) -> list[dict]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line))
            if len(out) >= n:
                break
    return out


def make_project(root: Path, corpora: Path, *, n_vi: int = 80, n_en: int = 40, max_pos: int = 256) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = Path(root)
    vi = _lines(corpora / VI_ALPACA, n_vi)
    en = json.loads((corpora / EN_ALPACA).read_text(encoding="utf-8"))[:n_en]
    text = [r["prompt"] + "\n" + r["response"] for r in vi] + [r["instruction"] + "\n" + r["output"] for r in en]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model_dir = root / "data" / "models" / "cpt"
    hf_tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)

    instr = root / "instr"
    instr.mkdir(parents=True)
    with gzip.open(instr / "vi.jsonl.gz", "wt", encoding="utf-8") as fh:
        for r in vi:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    (instr / "en.json").write_text(json.dumps(en, ensure_ascii=False), encoding="utf-8")

    clean = root / "data" / "clean"
    clean.mkdir(parents=True)
    # an "eval set" sentence that one vi training example contains verbatim (13+ words): decontamination must drop it
    leak = next(r["response"] for r in vi[1:] if len(r["response"].split()) >= 20)
    (clean / "ntrex_vi.jsonl").write_text(json.dumps({"id": "ntrex_vi/1", "source": "ntrex_vi", "lang": "vi",
                                                      "domain": "new", "role": "eval", "text": leak},
                                                     ensure_ascii=False) + "\n", encoding="utf-8")
    (clean / "manifest.json").write_text(json.dumps({"sources": [
        {"name": "ntrex_vi", "lang": "vi", "domain": "new", "role": "eval", "file": "ntrex_vi.jsonl", "docs": 1}]}))
    return root


def params(root: Path, **sft) -> dict:
    """Params for a seconds-long sft run on the micro project (tracking off)."""
    base = {
        "sources": [
            {"name": "vi", "path": str(root / "instr" / "vi.jsonl.gz"), "format": "prompt_response", "lang": "vi"},
            {"name": "en", "path": str(root / "instr" / "en.json"), "format": "alpaca", "lang": "en",
             "domain": "old"},
        ],
        "eval_fraction": 0.2, "max_length": 128, "steps": 6, "micro_batch": 4, "eval_interval": 3,
        "ckpt_interval": 2, "lr": 3e-3, "min_lr": 3e-4, "device": "cpu", "threads": 1,
        "plain_eval": {"sources": ["ntrex_vi"], "heldout": None, "max_bytes": 2000},
        "samples": {"max_new_tokens": 8, "prompts": {"vi": ["Ba màu chính là gì?"], "en": ["Name a color."]}},
    }
    base.update(sft)
    return {"seed": 7, "sft": base, "tracking": {"enabled": False}}
