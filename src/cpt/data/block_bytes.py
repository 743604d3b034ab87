"""UTF-8 bytes behind every token, so bits per byte is exact on ANY subset of blocks.

Bits per byte = summed NLL / (ln 2 x the bytes of the text behind the scored tokens). A split-wide bytes-per-token
ratio is wrong for a subset: the demo's new/val mixes vi (about 4 bytes a token) with zh/ja/ko (2-3), so scoring
the first blocks (all Vietnamese) with the whole split's ratio gave bpb 2.30 where eval measured 2.99. The shards
stage therefore knows the bytes of each token (from the tokenizer's character offsets: a token owns the bytes from
the previous token's end to its own end; BOS/EOS own none) and writes, per split, ``<split>.blocks.npy``:

    int64 (n_blocks, 2): [language index (meta ``lang_index``) of the block's targets, or -1 when they mix
                          languages;  UTF-8 bytes behind the block's TARGET tokens, positions 1..block_size-1]

Position 0 of a block is never a target (the model reads it, nothing predicts it), so its bytes are left out:
``NLL(targets) / (ln 2 x bytes[block])`` is the block's exact bits per byte, and sums over blocks stay exact.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def token_bytes(text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Bytes owned by each token of ``text`` (``offsets``: the tokenizer's character spans). Sums to the UTF-8 size
    of ``text`` exactly: tokens sharing a character (byte-level pieces of one emoji) give it to the first, and the
    last token owns any trailing characters no span covers."""
    n = len(offsets)
    out = np.zeros(n, dtype=np.int64)
    if n == 0:
        return out
    cp = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    size = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    cum = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(size, out=cum[1:])
    ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=n)
    ends = np.maximum.accumulate(np.clip(ends, 0, len(cp)))
    byte_ends = cum[ends]
    byte_ends[-1] = cum[-1]
    out[0] = byte_ends[0]
    out[1:] = np.diff(byte_ends)
    return out


def block_info(tok_bytes: np.ndarray, tok_lang: np.ndarray, block_size: int) -> np.ndarray:
    """``(n_blocks, 2)`` [language or -1, target bytes] for whole blocks of per-token bytes and language indices."""
    b = tok_bytes.reshape(-1, block_size)[:, 1:]
    lang = tok_lang.reshape(-1, block_size)[:, 1:]
    same = (lang == lang[:, :1]).all(axis=1)
    return np.stack([np.where(same, lang[:, 0], -1), b.sum(axis=1)], axis=1).astype(np.int64)
