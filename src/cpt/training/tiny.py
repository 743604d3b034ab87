"""The builtin tiny Llama (``base.model: builtin:tiny``): a real base model made from scratch, offline, in minutes.

Three steps, one function each:

1. ``train_tokenizer``: a SentencePiece BPE on the English training lines, Llama-2 style: byte_fallback, unk 0 /
   bos 1 / eos 2, no pad, digits split, dummy prefix, and identity normalisation without whitespace collapsing
   (clean already did NFC), so ``decode(encode(x)) == x``. ``write_hf_tokenizer`` puts ``tokenizer.model`` (the file
   the tokenizer stage extends) next to the HF files (``tokenizer.json``, ``tokenizer_config.json``) of a
   ``LlamaTokenizer`` that encodes like it and prepends ``<s>``.
   One known difference, inherent to transformers 5's Llama tokenizer (``Metaspace(prepend_scheme="first")``): for a
   text that STARTS with a space, SentencePiece still adds its dummy "▁" and HF does not (one "▁" token fewer).
   Documents from clean never start with whitespace, and inside a document both agree token for token.
2. ``tiny_config``: an untied-head Llama (like TinyLlama / Llama-2, so the train stage exercises untied lm_head
   init) with GQA and RoPE; a few million parameters.
3. ``pretrain``: a nanoGPT-style loop over random windows of the packed token stream: AdamW, linear warmup + cosine
   (``cpt.training.schedule.lr_at``), gradient clipping. ``evaluate`` scores held-out text in consecutive windows,
   so every held-out token after the first is predicted exactly once; bits per byte divide by its UTF-8 size.
   ``unigram_loss`` is the floor a real model must clearly beat.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

# Before torch loads libgomp (it reads this once): idle OpenMP threads sleep instead of spinning. Measured on the
# 2-core dev box with other jobs running: a micro Llama step took 5.0 s with 2 spinning threads, 0.12 s passive
# (and 0.15 s on 1 thread). On an idle machine the difference is noise; on a shared CI runner it is 40x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cpt.data.packing import val_ids  # noqa: E402
from cpt.data.records import iter_docs  # noqa: E402
from cpt.device import autocast, autocast_dtype, pick_device  # noqa: E402
from cpt.errors import DataError  # noqa: E402
from cpt.io import write_json  # noqa: E402
from cpt.layout import Layout  # noqa: E402
from cpt.progress import progress  # noqa: E402
from cpt.tok.codec import TextCodec  # noqa: E402
from cpt.training.schedule import lr_at  # noqa: E402

log = logging.getLogger("cpt.stages.base")

BUILTIN_TINY = "builtin:tiny"  # base.source that builds this model instead of loading one
DEFAULTS: dict[str, Any] = {
    # tokenizer
    "vocab_size": 4096,
    "character_coverage": 0.9999,
    "tokenizer_sentences": 200_000,  # lines sampled for SentencePiece training
    # model
    "hidden_size": 192,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
    "intermediate_size": 512,
    "block_size": 256,
    # pretraining
    "steps": 150,
    "batch_size": 16,
    "lr": 3.0e-3,
    "min_lr": 3.0e-4,
    "warmup_steps": 15,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    # held-out English (same hash split as shards; keep >= shards.val_fraction, see cpt.data.packing)
    "val_fraction": 0.1,
    "eval_bytes": 262_144,
    "device": "auto",
}

UNK, BOS, EOS = 0, 1, 2


# -- 1. tokenizer ---------------------------------------------------------------------------------------------------

def train_tokenizer(lines: Iterable[str], out_path: Path, *, vocab_size: int, seed: int,
                    character_coverage: float = 0.9999, max_sentences: int = 200_000) -> Path:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus gets a smaller vocab instead of an error
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=2,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    return out_path


def write_hf_tokenizer(spm_model: Path, folder: Path, *, model_max_length: int | None = None):
    """HF tokenizer files for a SentencePiece model, in ``folder`` next to its ``tokenizer.model``.

    transformers 5 trap (stack.md #8): ``LlamaTokenizer(vocab_file=...)`` silently builds an empty tokenizer; the
    conversion happens only through ``from_pretrained(folder)`` with the file named ``tokenizer.model``."""
    from transformers import LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "tokenizer.model"
    if Path(spm_model).resolve() != target.resolve():
        shutil.copyfile(spm_model, target)
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    tok = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=False, legacy=False,
                                         **kwargs)
    tok.save_pretrained(str(folder))
    return tok


# -- 2. model -------------------------------------------------------------------------------------------------------

def tiny_config(cfg: dict[str, Any], vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["layers"]),
        num_attention_heads=int(cfg["heads"]),
        num_key_value_heads=int(cfg["kv_heads"]),
        max_position_embeddings=int(cfg["block_size"]),
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=None,
        initializer_range=0.02,
    )


# -- 3. data, pretraining, evaluation -------------------------------------------------------------------------------

def token_stream(codec: TextCodec, texts: Sequence[str]) -> np.ndarray:
    """``[BOS] text EOS`` for every text, concatenated: the shards stage's packing and its text -> ids rule
    (``cpt.tok.codec``), so the base is pretrained and measured on ids exactly like the ones eval scores."""
    parts = [np.asarray(codec.document(ids), dtype=np.int64) for ids in codec.encode(list(texts))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def pretrain(model, data: torch.Tensor, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Random ``block_size`` windows of ``data``; next-token cross-entropy; AdamW; warmup + cosine."""
    device = next(model.parameters()).device
    amp = autocast_dtype(device)
    steps, bs, block = int(cfg["steps"]), int(cfg["batch_size"]), int(cfg["block_size"])
    if data.numel() < block + 2:
        raise ValueError(f"only {data.numel()} training tokens; need more than block_size={block}")
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matmuls and embeddings decay; norms do not
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(cfg["weight_decay"])}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(cfg["lr"]), betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    for step in progress(range(steps), desc="base pretrain", unit="step"):
        lr = lr_at(step, max_lr=float(cfg["lr"]), min_lr=float(cfg["min_lr"]), total_steps=steps,
                   warmup_steps=int(cfg["warmup_steps"]))
        for group in opt.param_groups:
            group["lr"] = lr
        ix = torch.randint(data.numel() - block - 1, (bs,), generator=gen)
        x = torch.stack([data[i:i + block] for i in ix.tolist()]).to(device)
        y = torch.stack([data[i + 1:i + 1 + block] for i in ix.tolist()]).to(device)
        with autocast(device, amp):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"base pretraining: loss is {loss.item()} at step {step}; lower base.tiny.lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["grad_clip"]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            log.info("step %4d/%d  loss %.4f  lr %.2e", step, steps, losses[-1], lr)
    seconds = time.perf_counter() - started
    tail = losses[-10:]
    return {
        "steps": steps,
        "train_tokens": steps * bs * block,
        "train_loss": sum(tail) / len(tail),
        "first_loss": losses[0],
        "train_seconds": seconds,
        "train_tokens_per_s": steps * bs * block / max(seconds, 1e-9),
    }


@torch.no_grad()
def evaluate(model, data: torch.Tensor, block: int, batch_size: int = 16) -> tuple[float, int]:
    """Sum of next-token NLL (nats) and the number of predicted tokens over consecutive windows of ``data``."""
    device = next(model.parameters()).device
    amp = autocast_dtype(device)
    model.eval()
    n = data.numel()
    starts = range(0, max(n - 1, 0), block)
    full = [s for s in starts if s + block + 1 <= n]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[s] for s in starts if s + block + 1 > n]  # the last, shorter window runs alone
    total, count = 0.0, 0
    for group in groups:
        width = min(block, n - 1 - group[0])
        x = torch.stack([data[s:s + width] for s in group]).to(device)
        y = torch.stack([data[s + 1:s + 1 + width] for s in group]).to(device)
        with autocast(device, amp):
            logits = model(input_ids=x).logits
        total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return total, count


def unigram_loss(train: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Mean NLL (nats) of ``targets`` under add-one-smoothed unigram frequencies of ``train``."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[targets].mean())


def heldout_texts(texts: Iterable[str], budget_bytes: int) -> list[str]:
    """Held-out documents in order until ``budget_bytes`` of UTF-8; the last one cut at a line end."""
    out, used = [], 0
    for text in texts:
        size = len(text.encode("utf-8"))
        if used + size <= budget_bytes:
            out.append(text)
            used += size
            continue
        room = budget_bytes - used
        cut = text.encode("utf-8")[:room].decode("utf-8", errors="ignore")
        nl = cut.rfind("\n")
        cut = cut[:nl] if nl > 0 else cut
        if cut.strip():
            out.append(cut)
        break
    return out


def build(train_texts: list[str], heldout: list[str], out: Path, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Tokenizer + model + pretraining + evaluation; writes the HF folder ``out``; returns metrics."""
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    lines = [line for text in train_texts for line in text.split("\n") if line.strip()]
    if not lines:
        raise ValueError("no English training text")
    spm_path = train_tokenizer(lines, out / "tokenizer.model", vocab_size=int(cfg["vocab_size"]), seed=seed,
                               character_coverage=float(cfg["character_coverage"]),
                               max_sentences=int(cfg["tokenizer_sentences"]))
    hf_tok = write_hf_tokenizer(spm_path, out, model_max_length=int(cfg["block_size"]))
    vocab_size = len(hf_tok)
    codec = TextCodec.from_folder(out)  # "</s>" inside a book is text, not an EOS (as in the shards stage)
    if (codec.bos_id, codec.eos_id) != (BOS, EOS):
        raise DataError(f"{out}: the tokenizer's BOS/EOS are {codec.bos_id}/{codec.eos_id}, expected {BOS}/{EOS}")
    tokenizer_seconds = time.perf_counter() - t0

    train_ids = token_stream(codec, train_texts)
    eval_texts = heldout_texts(heldout, int(cfg["eval_bytes"]))
    eval_ids = token_stream(codec, eval_texts)
    eval_bytes = sum(len(t.encode("utf-8")) for t in eval_texts)
    log.info("tokenizer: %d pieces in %.1fs; %d train tokens, %d held-out tokens (%d bytes)", vocab_size,
             tokenizer_seconds, train_ids.size, eval_ids.size, eval_bytes)

    device = pick_device(str(cfg["device"]))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(cfg, vocab_size)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    stats = pretrain(model, torch.from_numpy(train_ids), cfg, seed)

    metrics: dict[str, Any] = {"params": n_params, "vocab_size": vocab_size, "tokenizer_seconds": tokenizer_seconds,
                               "train_corpus_tokens": int(train_ids.size), **stats}
    if eval_ids.size >= 2:
        nll, count = evaluate(model, torch.from_numpy(eval_ids), int(cfg["block_size"]), int(cfg["batch_size"]))
        metrics.update({
            "heldout_tokens": count,
            "heldout_bytes": eval_bytes,
            "heldout_loss": nll / count,
            "heldout_bpb": nll / math.log(2) / eval_bytes,
            "unigram_loss": unigram_loss(train_ids, eval_ids[1:], vocab_size),
        })
        metrics["unigram_bpb"] = metrics["unigram_loss"] * count / math.log(2) / eval_bytes
    model.to("cpu").save_pretrained(str(out))
    return metrics


def build_tiny_base(cfg: dict[str, Any], seed: int, layout: Layout, tmp: Path) -> dict[str, Any]:
    tcfg = cfg["tiny"]
    try:
        docs = list(iter_docs(layout.clean, role="train", domain="old"))
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    if not docs:
        raise DataError(f"{layout.clean}: no role: train, domain: old documents to pretrain builtin:tiny on")
    held = val_ids([str(d["id"]) for d in docs], seed, float(tcfg["val_fraction"]))
    train = [d["text"] for d in docs if str(d["id"]) not in held]
    heldout = [d["text"] for d in docs if str(d["id"]) in held]
    log.info("builtin:tiny: %d English documents for pretraining, %d held out", len(train), len(heldout))
    try:
        metrics = build(train, heldout, tmp, tcfg, seed)
    except (ValueError, FloatingPointError) as exc:
        raise DataError(f"{layout.clean}: builtin:tiny pretraining failed: {exc}") from exc
    info = {
        "source": BUILTIN_TINY,
        "seed": seed,
        "tiny": tcfg,
        "train_docs": len(train),
        "heldout_docs": sorted(held),
        # timings stay in metrics/base.json: inside the artifact they changed its DVC hash on every identical rerun
        "metrics": {k: v for k, v in metrics.items() if not k.endswith(("_seconds", "_per_s"))},
    }
    write_json(tmp / "cpt_base.json", info)
    if "heldout_loss" in metrics:
        log.info("held-out loss %.4f (%.4f bits/byte) vs unigram %.4f", metrics["heldout_loss"],
                 metrics["heldout_bpb"], metrics["unigram_loss"])
    return {"source": BUILTIN_TINY, "train_docs": len(train), "heldout_docs": len(heldout), **metrics}
