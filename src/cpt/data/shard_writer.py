"""Writing one domain's token shards, in two steps so the tokenisation runs on the engine (one task per clean
shard, local processes or Ray) while the outputs stay the bytes of one sequential pass:

1. ``encode_shard`` (an engine task): the shard's documents, batched by characters and encoded with the tokenizer's
   fast backend, each framed as ``[BOS] ids EOS`` with the UTF-8 bytes behind every token
   (``cpt.data.block_bytes``). To disk, in document order: the tokens, the bytes per token (uint16), a table per
   document (tokens, language, train/val score) and the JSON line of every document that may be held out.
2. ``pack_domain`` (the driver): the shards' documents in corpus order through ``StreamSplit`` (train/val by a hash
   of the id; its two held-back documents included) into one ``BlockWriter`` per split, with the held-out documents
   written to heldout.jsonl as they reach val. Only arrays are copied here; no text is read again (except the one
   document that becomes val when no score falls under ``val_fraction``).

``<split>.blocks.npy`` beside each ``<split>.bin``: per block, its language and the UTF-8 bytes behind its targets
(streamed to disk as the blocks are written, so memory does not grow with the corpus)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cpt.data.packing import BlockWriter, StreamSplit, encode_pipelined, frame, val_score
from cpt.data.shardio import read_records
from cpt.errors import DataError
from cpt.io import atomic_open
from cpt.tok.codec import TextCodec

SPLITS = ("train", "val")


def _batches(docs: Iterator[dict[str, Any]], batch_chars: int, where: str) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    size = 0
    for doc in docs:
        text = doc.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where}: document {doc.get('id')!r} has no text string")
        batch.append(doc)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@functools.lru_cache(maxsize=2)
def _codec(folder: str, eos_token: str, add_bos: Any) -> TextCodec:
    """One tokenizer per worker process, loaded by its first task."""
    return TextCodec.from_folder(folder, eos_token=eos_token, add_bos=add_bos)


def _work(prefix: str) -> dict[str, Path]:
    return {k: Path(f"{prefix}.{k}") for k in ("tokens", "nbytes", "docs.npz", "val.jsonl")}


def encode_shard(t: dict[str, Any]) -> dict[str, Any]:
    """Engine task: the clean shard ``t["path"]`` -> its framed documents under the prefix ``t["work"]``."""
    if t["threads"] and os.getpid() != t["driver_pid"]:
        # a pool or Ray worker owns its share of the cores: the tokenizer's rayon pool (created at its first encode
        # in this process) must not take them all; run in the stage's own process, it keeps every core
        os.environ["RAYON_NUM_THREADS"] = str(t["threads"])
    codec = _codec(t["tokenizer"], t["eos_token"], t["add_bos"])
    dtype = np.dtype(t["dtype"]).newbyteorder("<")
    files = _work(t["work"])
    ntok: list[int] = []
    scores: list[float] = []
    langs: list[str] = []
    chars = 0
    with open(files["tokens"], "wb") as tok_fh, open(files["nbytes"], "wb") as nb_fh, \
            open(files["val.jsonl"], "w", encoding="utf-8") as val_fh:
        batches = _batches(read_records(t["path"]), int(t["batch_chars"]), t["path"])
        for batch, encodings in encode_pipelined(codec.tok, batches, offsets=True):
            for doc, enc in zip(batch, encodings):
                arr, nbytes = frame(enc.ids, doc["text"], enc.offsets, codec.specials, dtype)
                if len(nbytes) and int(nbytes.max()) > 0xFFFF:
                    raise DataError(f"{t['path']}: document {doc.get('id')!r} has a token over 65535 bytes")
                tok_fh.write(arr.tobytes())
                nb_fh.write(nbytes.astype("<u2").tobytes())
                score = val_score(str(doc["id"]), int(t["seed"]))
                if score < float(t["val_fraction"]):  # may be held out: its record goes to heldout.jsonl
                    val_fh.write(f"{len(ntok)}\t{json.dumps(doc, ensure_ascii=False)}\n")
                ntok.append(len(arr))
                scores.append(score)
                langs.append(str(doc.get("lang", "und")))
                chars += len(doc["text"])
    lang_index = sorted(set(langs))
    np.savez(files["docs.npz"], ntok=np.asarray(ntok, dtype=np.int64), score=np.asarray(scores, dtype=np.float64),
             lang=np.asarray([lang_index.index(x) for x in langs], dtype=np.int32))
    return {"docs": len(ntok), "chars": chars, "langs": lang_index}


class _Shard:
    """One encoded shard, memory-mapped: document ``i``'s tokens, bytes, language and held-out line."""

    def __init__(self, path: str, prefix: str, info: dict[str, Any], dtype: np.dtype) -> None:
        files = _work(prefix)
        self.path = path
        table = np.load(files["docs.npz"])
        self.score, self.lang = table["score"], table["lang"]
        self.start = np.zeros(len(table["ntok"]) + 1, dtype=np.int64)
        np.cumsum(table["ntok"], out=self.start[1:])
        empty = self.start[-1] == 0
        self.tokens = np.zeros(0, dtype) if empty else np.memmap(files["tokens"], dtype=dtype, mode="r")
        self.nbytes = np.zeros(0, "<u2") if empty else np.memmap(files["nbytes"], dtype="<u2", mode="r")
        self.langs = info["langs"]
        self.val: dict[int, str] = {}
        with open(files["val.jsonl"], encoding="utf-8") as fh:
            for line in fh:
                i, rec = line.rstrip("\n").split("\t", 1)
                self.val[int(i)] = rec

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray, str, str | None]:
        a, b = self.start[i], self.start[i + 1]
        return self.tokens[a:b], self.nbytes[a:b], self.langs[int(self.lang[i])], self.val.get(i)

    def record_line(self, i: int) -> str:
        """The JSON line of document ``i`` for a document that reaches val although its score did not."""
        return json.dumps(next(islice(read_records(self.path), i, None)), ensure_ascii=False)


def _npy_from_raw(raw: Path, dest: Path, blocks: int) -> None:
    """``np.save`` of an int64 ``(blocks, 2)`` array whose rows were streamed to ``raw``: the same bytes, written
    in chunks, so the stage's memory does not grow with the number of blocks."""
    if raw.stat().st_size != blocks * 16:
        raise DataError(f"{raw}: {raw.stat().st_size} bytes of block info for {blocks} blocks")
    with atomic_open(dest, "wb", encoding=None) as fh, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<i8", "fortran_order": False, "shape": (blocks, 2)})
        shutil.copyfileobj(src, fh, 16 << 20)
    raw.unlink()


def pack_domain(domain: str, paths: list[Path], encoded: list[tuple[str, dict[str, Any]]], out: Path, specials,
                dtype, cfg, seed, heldout_fh, bar: Any = None) -> dict[str, dict[str, Any]]:
    """The driver's step: ``encoded`` (per clean shard of the domain, in corpus order: the task's work prefix and
    result) packed into ``out/<domain>/{train,val}.bin`` + ``.blocks.npy``; returns each split's counts."""
    block = int(cfg["block_size"])
    dtype = np.dtype(dtype).newbyteorder("<")
    splitter = StreamSplit(seed, float(cfg["val_fraction"]))
    stats: dict[str, dict[str, Any]] = {}
    (out / domain).mkdir(parents=True, exist_ok=True)
    raw_info = {split: out / domain / f".{split}.blocks.raw" for split in SPLITS}
    with contextlib.ExitStack() as stack:
        writers = {
            split: BlockWriter(stack.enter_context(atomic_open(out / domain / f"{split}.bin", "wb")), block, dtype,
                               specials, info_fh=stack.enter_context(open(raw_info[split], "wb")))
            for split in SPLITS
        }

        def emit(routed: list[tuple[str, tuple[_Shard, int]]]) -> None:
            for split, (shard, i) in routed:
                arr, nbytes, lang, line = shard.doc(i)
                writers[split].add_framed(arr, nbytes, lang)
                if split == "val":
                    heldout_fh.write(line if line is not None else shard.record_line(i))
                    heldout_fh.write("\n")

        for path, (prefix, info) in zip(paths, encoded):
            shard = _Shard(str(path), prefix, info, dtype)
            for i in range(info["docs"]):
                emit(splitter.route(None, (shard, i), score=float(shard.score[i])))
            if bar is not None:
                bar.update(info["docs"])
        emit(splitter.finish())
        for split in SPLITS:
            stats[split] = writers[split].finish().to_dict()
    for split in SPLITS:
        # bytes and language behind every block (cpt.data.block_bytes): exact bits per byte on any subset
        _npy_from_raw(raw_info[split], out / domain / f"{split}.blocks.npy", stats[split]["blocks"])
        st = stats[split]
        if st["docs"] == 0 and st["tail_tokens"] > 0:
            raise DataError(
                f"{out / domain / (split + '.bin')}: the {domain}/{split} text ({st['tail_tokens']} tokens) does "
                f"not fill one block of {block}; lower shards.block_size or raise shards.val_fraction"
            )
    return stats
