"""Stage `shards`: tokenise the cleaned ``role: train`` text into packed, memory-mappable token blocks.

Each clean shard of each domain (``new``, then ``old``; ``role: eval`` sources never get here) is an engine task
(``engine``: local processes or Ray, as for clean; ``cpt.data.shard_writer.encode_shard``): its documents are encoded
with the extended tokenizer's fast backend and framed as ``[BOS] text EOS`` (BOS only when the tokenizer's convention
has one, e.g. Llama's ``<s>``). The driver then takes the documents in corpus order, splits them train/val by a hash
of their id and the seed (``cpt.data.packing.StreamSplit``) and packs them into ``block_size``-token blocks
(``cpt.data.packing.BlockWriter``; the last partial block of each split is dropped and counted). So the files are the
same bytes with 1 or N workers, local or Ray. Outputs (docs/architecture.md):

    data/shards/{new,old}/{train,val}.bin   flat little-endian uint16/uint32 ids, blocks back to back
    data/shards/meta.json                   dtype, block_size, vocab_size, eos_id, bos_id, per-split counts
    data/shards/heldout.jsonl               the val documents as records, for tokenizer-independent eval

Read a split with ``numpy.memmap(path, dtype=meta["dtype"], mode="r").reshape(-1, meta["block_size"])``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

from cpt.data import engine
from cpt.data.engine import Engine
from cpt.data.packing import token_dtype, tokenizers_parallelism
from cpt.data.records import DOMAINS, select_sources, shard_paths
from cpt.data.shard_writer import encode_shard, pack_domain
from cpt.errors import ConfigError, DataError
from cpt.io import atomic_open, replace_dir, shards_content, write_json
from cpt.layout import Layout
from cpt.params import stage_config
from cpt.progress import progress
from cpt.tok.codec import TextCodec

log = logging.getLogger("cpt.stages.shards")

DEFAULTS: dict[str, Any] = {
    "tokenizer": "data/tokenizer",  # HF tokenizer folder with tokenizer.json (the tokenizer stage's output)
    "block_size": 256,  # tokens per block; the train stage's sequence length
    "val_fraction": 0.05,  # share of each domain's documents held out (by hash of id + seed)
    "add_bos": "auto",  # auto: prepend BOS iff the tokenizer's post-processor does (Llama yes, GPT-2 no)
    "eos_token": "auto",  # auto: tokenizer_config.json's eos_token
    "batch_chars": 4_000_000,  # characters per encode_batch call (bounds memory; big enough to use every core)
}


def config(params: dict[str, Any]) -> dict[str, Any]:
    cfg = stage_config(params, "shards", DEFAULTS)
    if not isinstance(cfg["block_size"], int) or cfg["block_size"] < 2:
        raise ConfigError(f"params shards.block_size: expected an integer >= 2, got {cfg['block_size']!r}")
    if not 0 <= float(cfg["val_fraction"]) < 0.5:
        raise ConfigError(f"params shards.val_fraction: expected 0 <= value < 0.5, got {cfg['val_fraction']!r}")
    if cfg["add_bos"] not in ("auto", True, False):
        raise ConfigError(f"params shards.add_bos: expected auto, true or false, got {cfg['add_bos']!r}")
    if int(cfg["batch_chars"]) < 1:
        raise ConfigError("params shards.batch_chars must be positive")
    return cfg


def run(params: dict[str, Any], layout: Layout) -> dict[str, Any]:
    cfg = config(params)
    seed = int(params.get("seed", 0))
    tok_dir = layout.resolve(cfg["tokenizer"])
    # cpt's one text -> ids rule (cpt.tok.codec), the same eval, the overlap check and the tiny base use
    codec = TextCodec.from_folder(tok_dir, eos_token=str(cfg["eos_token"]), add_bos=cfg["add_bos"])
    specials = codec.specials
    vocab_size = codec.tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    try:
        n_docs = sum(s.docs for s in select_sources(layout.clean, role="train"))
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from exc
    if n_docs == 0:
        raise DataError(f"{layout.clean}: no role: train documents to shard")

    # Build into a sibling folder and swap it in at the end: a killed run never leaves a half-written data/shards.
    out = layout.shards
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    splits: dict[str, dict[str, Any]] = {}
    work = out.with_name(f".{out.name}.work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    eng_cfg = engine.config(params)
    # the tokenizer's rayon threads per task: every core in this process (workers: 1), the cores shared out among a
    # local pool's workers, one per task on Ray (a task holds one CPU there)
    threads = None if eng_cfg.kind == "local" and eng_cfg.workers == 1 else \
        max(1, (os.cpu_count() or 1) // eng_cfg.workers) if eng_cfg.kind == "local" else 1
    task = {"tokenizer": str(tok_dir), "eos_token": str(cfg["eos_token"]), "add_bos": cfg["add_bos"],
            "dtype": dtype.name, "seed": seed, "val_fraction": float(cfg["val_fraction"]),
            "batch_chars": int(cfg["batch_chars"]), "threads": threads}
    try:
        with tokenizers_parallelism(True), Engine(eng_cfg) as eng, atomic_open(tmp / "heldout.jsonl") as heldout_fh:
            paths = {d: shard_paths(layout.clean, role="train", domain=d) for d in DOMAINS}
            tasks = [({**task, "path": str(p), "work": str(work / f"{d}-{k:06d}"), "driver_pid": os.getpid()},)
                     for d in DOMAINS for k, p in enumerate(paths[d])]  # both domains in one map: one balanced pool
            results = eng.map(encode_shard, tasks, name="shards: encode",
                              cost=[os.path.getsize(t[0]["path"]) for t in tasks])
            done = 0
            with progress(total=sum(r["docs"] for r in results), desc="shards: pack", unit=" docs") as bar:
                for domain in DOMAINS:
                    encoded = [(t[0]["work"], r) for t, r in zip(tasks[done:done + len(paths[domain])], results[done:])]
                    done += len(paths[domain])
                    for split, st in pack_domain(domain, paths[domain], encoded, tmp, specials, dtype, cfg, seed,
                                                 heldout_fh, bar).items():
                        splits[f"{domain}/{split}"] = st
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started

    meta = {
        "dtype": dtype.name,
        "block_size": int(cfg["block_size"]),
        "vocab_size": vocab_size,
        "eos_id": specials.eos_id,
        "bos_id": specials.bos_id,
        "tokenizer": str(cfg["tokenizer"]),
        "seed": seed,
        "val_fraction": float(cfg["val_fraction"]),
        "tail": "drop",
        "block_info": "<split>.blocks.npy: int64 (blocks, 2) = [index into the split's lang_index, or -1 when the "
                      "block's targets mix languages; UTF-8 bytes behind the block's targets (positions 1..)]",
        "splits": splits,
        "content": shards_content(tmp),  # per domain: the resume fingerprint tells other bytes from equal counts
    }
    write_json(tmp / "meta.json", meta)
    replace_dir(tmp, out)

    tokens = sum(s["tokens"] for s in splits.values())
    for name, st in splits.items():
        log.info("%-9s %11d tokens %8d blocks %7d docs %12d bytes (tail dropped: %d)", name, st["tokens"],
                 st["blocks"], st["docs"], st["bytes"], st["tail_tokens"])
    metrics: dict[str, Any] = {
        "tokens": tokens,
        "blocks": sum(s["blocks"] for s in splits.values()),
        "docs": sum(s["docs"] for s in splits.values()),
        "tail_tokens_dropped": sum(s["tail_tokens"] for s in splits.values()),
        "tokens_per_s": round((tokens + sum(s["tail_tokens"] for s in splits.values())) / max(seconds, 1e-9), 1),
        "block_size": int(cfg["block_size"]),
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "bos": specials.bos_id is not None,
    }
    for name, st in splits.items():
        key = name.replace("/", "_")
        for field in ("tokens", "blocks", "docs", "bytes", "tail_tokens"):
            metrics[f"{key}_{field}"] = st[field]
    return metrics
