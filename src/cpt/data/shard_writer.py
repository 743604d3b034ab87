"""Writing one domain's token shards: documents batched by characters, encoded in a worker thread, packed into
fixed-size blocks per split (train/val by a hash of the document id), held-out documents recorded for eval, and
``<split>.blocks.npy`` beside each ``<split>.bin``: per block, its language and the UTF-8 bytes behind its targets."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cpt.data.packing import BlockWriter, StreamSplit, encode_pipelined
from cpt.data.records import iter_docs
from cpt.errors import DataError
from cpt.io import atomic_open
from cpt.layout import Layout

SPLITS = ("train", "val")


def _batches(docs: Iterator[dict[str, Any]], batch_chars: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    size = 0
    for doc in docs:
        text = doc.get("text")
        if not isinstance(text, str):
            raise DataError(f"data/clean ({doc.get('source')}): document {doc.get('id')!r} has no text string")
        batch.append(doc)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _npy_from_raw(raw: Path, dest: Path, blocks: int) -> None:
    """``np.save`` of an int64 ``(blocks, 2)`` array whose rows were streamed to ``raw``: the same bytes, written
    in chunks, so the stage's memory does not grow with the number of blocks."""
    if raw.stat().st_size != blocks * 16:
        raise DataError(f"{raw}: {raw.stat().st_size} bytes of block info for {blocks} blocks")
    with atomic_open(dest, "wb", encoding=None) as fh, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<i8", "fortran_order": False, "shape": (blocks, 2)})
        shutil.copyfileobj(src, fh, 16 << 20)
    raw.unlink()


def pack_domain(domain: str, layout: Layout, out: Path, tok, specials, dtype, cfg, seed, heldout_fh,
                 bar) -> dict[str, dict[str, Any]]:
    block = int(cfg["block_size"])
    splitter = StreamSplit(seed, float(cfg["val_fraction"]))
    stats: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        raw_info = {split: out / domain / f".{split}.blocks.raw" for split in SPLITS}
        writers = {
            split: BlockWriter(stack.enter_context(atomic_open(out / domain / f"{split}.bin", "wb")), block, dtype,
                               specials, info_fh=stack.enter_context(open(raw_info[split], "wb")))
            for split in SPLITS
        }

        def emit(routed):
            for split, (doc, enc) in routed:
                writers[split].add(enc.ids, doc["text"], doc.get("lang", "und"), enc.offsets)
                if split == "val":
                    heldout_fh.write(json.dumps(doc, ensure_ascii=False))
                    heldout_fh.write("\n")

        docs = iter_docs(layout.clean, role="train", domain=domain, prefetch=2)  # shards read ahead in threads
        for batch, encodings in encode_pipelined(tok, _batches(docs, int(cfg["batch_chars"])), offsets=True):
            for doc, enc in zip(batch, encodings):
                emit(splitter.route(str(doc["id"]), (doc, enc)))
            bar.update(sum(len(d["text"]) for d in batch))
        emit(splitter.finish())
        for split in SPLITS:
            st = writers[split].finish()
            stats[split] = st.to_dict()
    for split in SPLITS:
        # bytes and language behind every block (cpt.data.block_bytes): exact bits per byte on any subset
        _npy_from_raw(raw_info[split], out / domain / f"{split}.blocks.npy", stats[split]["blocks"])
    for split in SPLITS:
        st = stats[split]
        if st["docs"] == 0 and st["tail_tokens"] > 0:
            raise DataError(
                f"{out / domain / (split + '.bin')}: the {domain}/{split} text ({st['tail_tokens']} tokens) does "
                f"not fill one block of {block}; lower shards.block_size or raise shards.val_fraction"
            )
    return stats
