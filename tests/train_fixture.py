"""A micro project for the train stage's tests, built without the base / tokenizer / shards stages:

- data/base: a random tiny LlamaForCausalLM (tied or untied head) + a byte-level BPE trained on a few KB of real
  English (en_gutenberg) with `tokenizers`;
- data/tokenizer: that tokenizer + Vietnamese words (from viwiki) added as tokens, and new_tokens.json
  {base_vocab, vocab, added[{id, piece, text, base_ids}]} in the contract's format;
- data/shards: real English (old) and Vietnamese (new) text tokenised with the extended tokenizer, packed into
  blocks with EOS between documents, uint16 .bin files + meta.json with tokens and bytes per split.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

BLOCK = 33  # 32 input tokens per sequence


def _docs(path: Path, n_docs: int, chars: int) -> list[str]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["text"]
            for i in range(0, min(len(text), chars * 4), chars):
                out.append(text[i : i + chars])
                if len(out) >= n_docs:
                    return out
    return out


def make_project(root: Path, corpora: Path, *, tied: bool = False, n_added: int = 40, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = Path(root)
    en = _docs(corpora / "en_gutenberg" / "en_gutenberg_books.jsonl.gz", 60, 400)
    vi = _docs(corpora / "viwiki" / "viwiki.jsonl.gz", 60, 400)

    # base tokenizer: byte-level BPE on English only
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(en[:40], trainer)
    base_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    base_dir = root / "data" / "base"
    base_tok.save_pretrained(base_dir)
    base_vocab = len(base_tok)

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=base_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(base_dir)
    (base_dir / "cpt_base.json").write_text(json.dumps({"source": "test-fixture"}))

    # extended tokenizer: + frequent Vietnamese words (non-ASCII ones, as the tokenizer stage prefers)
    counts: dict[str, int] = {}
    for d in vi:
        for w in d.split():
            if any(ord(c) > 127 for c in w) and w.isalpha():
                counts[w] = counts.get(w, 0) + 1
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:n_added]
    ext = PreTrainedTokenizerFast.from_pretrained(base_dir)
    from tokenizers import AddedToken

    ext.add_tokens([AddedToken(w, normalized=False) for w in words])
    tok_dir = root / "data" / "tokenizer"
    ext.save_pretrained(tok_dir)
    added = [{"id": ext.convert_tokens_to_ids(w), "piece": w, "text": w,
              "base_ids": base_tok.encode(w, add_special_tokens=False)} for w in words]
    vocab = len(ext)
    (tok_dir / "new_tokens.json").write_text(json.dumps({"base_vocab": base_vocab, "vocab": vocab, "added": added}))

    # shards
    sh = root / "data" / "shards"
    splits = {}
    for domain, docs in (("old", en), ("new", vi)):
        for split, part in (("train", docs[:48]), ("val", docs[48:])):
            ids: list[int] = []
            nbytes = 0
            for d in part:
                ids += ext.encode(d, add_special_tokens=False) + [ext.eos_token_id]
                nbytes += len(d.encode("utf-8"))
            n = len(ids) // BLOCK * BLOCK
            arr = np.array(ids[:n], dtype="<u2")
            (sh / domain).mkdir(parents=True, exist_ok=True)
            arr.tofile(sh / domain / f"{split}.bin")
            splits[f"{domain}/{split}"] = {"tokens": len(ids), "blocks": n // BLOCK, "docs": len(part),
                                           "bytes": nbytes, "langs": {"en" if domain == "old" else "vi": len(ids)}}
    meta = {"dtype": "uint16", "block_size": BLOCK, "vocab_size": vocab, "eos_id": ext.eos_token_id,
            "tokenizer": "data/tokenizer", "splits": splits}
    (sh / "meta.json").write_text(json.dumps(meta))
    return root


def tiny_params(**train) -> dict:
    """Params for a few-second run on the micro project."""
    base = {"steps": 12, "micro_batch": 4, "grad_accum": 1, "lr": 3e-3, "min_lr": 3e-4, "warmup": 0.1,
            "eval_interval": 4, "eval_blocks": 8, "ckpt_interval": 4, "keep_checkpoints": 3, "log_interval": 4}
    base.update(train)
    return {"seed": 7, "train": base}
