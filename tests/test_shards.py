"""Stage `shards` and cpt.data.packing: packing is lossless, the split is deterministic and shared with `base`, eval text
never gets in, and the counts (tokens, bytes, tail) are exact. Real text from the corpora; a small SentencePiece
Llama tokenizer trained here stands in for the extended tokenizer (same folder format)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see cpt.training.tiny: spinning OpenMP threads on a busy 2-core box

import gzip
import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest

from cpt.data import packing
from cpt.stages import shards
from cpt.errors import ConfigError, DataError
from cpt.io import write_jsonl
from cpt.layout import Layout
from cpt.data.records import SourceInfo, write_manifest

EVAL_MARKER = "ZZEVALONLYZZ"


def _read(path: Path, n: int):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= n:
                break
            yield json.loads(line)


@pytest.fixture(scope="module")
def texts(corpora):
    vi = [r["text"] for r in _read(corpora / "viwiki" / "viwiki.jsonl.gz", 80)]
    en = [r["text"][:30_000].strip() for r in _read(corpora / "en_gutenberg" / "en_gutenberg_books.jsonl.gz", 12)]
    zh = [r["text"] for r in _read(corpora / "zh_cmrc2018_contexts" / "cmrc2018_contexts.jsonl", 20)]
    return {"vi": vi, "en": en, "zh": zh}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, texts):
    """A Llama-format tokenizer folder (tokenizer.model + tokenizer.json), like data/base and data/tokenizer."""
    from cpt.training import tiny

    folder = tmp_path_factory.mktemp("tok")
    lines = [ln for t in texts["en"] + texts["vi"][:40] for ln in t.split("\n") if ln.strip()]
    tiny.train_tokenizer(lines, folder / "tokenizer.model", vocab_size=512, seed=0)
    tiny.write_hf_tokenizer(folder / "tokenizer.model", folder)
    return folder


def _make_clean(root: Path, texts) -> Layout:
    layout = Layout(root)
    clean = layout.clean
    rows = {
        "viwiki": [dict(id=f"viwiki/{i}", source="viwiki", lang="vi", domain="new", role="train", text=t)
                   for i, t in enumerate(texts["vi"])],
        "zh": [dict(id=f"zh/{i}", source="zh", lang="zh", domain="new", role="train", text=t)
               for i, t in enumerate(texts["zh"])],
        "en": [dict(id=f"en/{i}", source="en", lang="en", domain="old", role="train", text=t)
               for i, t in enumerate(texts["en"])],
        # edge cases: outside-vocabulary characters (byte fallback), a one-word doc, text with leading newline
        "edge": [dict(id="edge/emoji", source="edge", lang="vi", domain="new", role="train", text="Xin chào 🦜🦜 ∮ Ω"),
                 dict(id="edge/one", source="edge", lang="vi", domain="new", role="train", text="a"),
                 dict(id="edge/nl", source="edge", lang="vi", domain="new", role="train", text="x\n\n  y  z\t."),
                 # special-token strings in text stay text: no fake EOS/BOS inside a document
                 dict(id="edge/sp", source="edge", lang="vi", domain="new", role="train",
                      text="literal </s> and <s> and <unk> in text")],
        "ev": [dict(id=f"ev/{i}", source="ev", lang="vi", domain="new", role="eval", text=f"{EVAL_MARKER} câu {i}")
               for i in range(5)],
    }
    infos = []
    for name, docs in rows.items():
        write_jsonl(clean / f"{name}.jsonl", docs)
        d0 = docs[0]
        infos.append(SourceInfo(name, d0["lang"], d0["domain"], d0["role"], f"{name}.jsonl", len(docs)))
    write_manifest(clean, infos)
    return layout


def _params(tokenizer_dir, **kw):
    return {"seed": 7, "shards": {"tokenizer": str(tokenizer_dir), "block_size": 64, "val_fraction": 0.1, **kw}}


@pytest.fixture(scope="module")
def built(tmp_path_factory, texts, tokenizer_dir):
    layout = _make_clean(tmp_path_factory.mktemp("proj"), texts)
    metrics = shards.run(_params(tokenizer_dir), layout)
    return layout, metrics


def _docs(layout, domain):
    from cpt.data.records import iter_docs

    return list(iter_docs(layout.clean, role="train", domain=domain))


def _split_docs(stream: np.ndarray, bos: int | None, eos: int) -> list[list[int]]:
    docs, cur = [], []
    for t in stream.tolist():
        if t == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    if bos is not None:
        assert all(d and d[0] == bos for d in docs), "every document starts with BOS"
        docs = [d[1:] for d in docs]
    return docs + ([cur[1:] if bos is not None and cur else cur] if cur else [])


def test_meta_and_files_follow_the_contract(built):
    layout, metrics = built
    meta = json.loads((layout.shards / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["block_size"] == 64
    assert meta["eos_id"] == 2 and meta["bos_id"] == 1  # Llama convention: <s> ... </s>
    assert set(meta["splits"]) == {"new/train", "new/val", "old/train", "old/val"}
    for name, st in meta["splits"].items():
        path = layout.shards / f"{name}.bin"
        assert path.stat().st_size == st["blocks"] * 64 * 2
        assert st["tokens"] == st["blocks"] * 64
        assert sum(st["langs"].values()) == st["tokens"]
        assert st["blocks"] > 0 and st["docs"] > 0 and st["bytes"] > 0
        assert 0 <= st["tail_tokens"] < 64
        blocks = np.memmap(path, dtype=meta["dtype"], mode="r").reshape(-1, meta["block_size"])
        assert blocks.shape == (st["blocks"], 64) and int(blocks.max()) < meta["vocab_size"]
    assert set(meta["splits"]["new/train"]["langs"]) == {"vi", "zh"}
    assert metrics["tokens"] == sum(s["tokens"] for s in meta["splits"].values())
    assert metrics["tail_tokens_dropped"] == sum(s["tail_tokens"] for s in meta["splits"].values())
    assert metrics["new_train_tokens"] == meta["splits"]["new/train"]["tokens"]


def test_packing_is_lossless_and_the_split_matches_val_ids(built, tokenizer_dir):
    """Decode every document back out of the .bin files: the train and val streams hold exactly the documents
    val_ids assigns to them, each text unchanged (only the last, tail-cut document is a prefix)."""
    layout, _ = built
    meta = json.loads((layout.shards / "meta.json").read_text())
    tok = packing.load_tokenizer(tokenizer_dir)
    heldout = [json.loads(line) for line in (layout.shards / "heldout.jsonl").read_text().splitlines()]
    for domain in ("new", "old"):
        docs = _docs(layout, domain)
        held = packing.val_ids([d["id"] for d in docs], 7, 0.1)
        assert held and len(held) < len(docs)
        assert {d["id"] for d in heldout if d["domain"] == domain} == held
        for split, expected in (("train", [d for d in docs if d["id"] not in held]),
                                ("val", [d for d in docs if d["id"] in held])):
            stream = np.fromfile(layout.shards / domain / f"{split}.bin", dtype=meta["dtype"])
            decoded = [tok.decode(ids) for ids in _split_docs(stream, meta["bos_id"], meta["eos_id"])]
            want = sorted(d["text"] for d in expected)
            # all but possibly the last (tail-cut) document come back whole
            whole = [t for t in decoded if t in set(want)]
            assert len(whole) >= len(expected) - 1
            assert len(decoded) <= len(expected)
            if len(whole) < len(decoded):
                cut = [t for t in decoded if t not in set(want)]
                prefix = cut[0].rstrip("\ufffd")  # the cut may fall inside a character's byte-fallback tokens
                assert len(cut) == 1 and any(w.startswith(prefix) for w in want)


def test_eval_documents_never_reach_the_shards(built):
    layout, _ = built
    meta = json.loads((layout.shards / "meta.json").read_text())
    assert EVAL_MARKER not in (layout.shards / "heldout.jsonl").read_text()
    docs = sum(s["docs"] for s in meta["splits"].values())
    assert docs <= 80 + 20 + 12 + 4  # role: train documents only (5 eval docs exist in the manifest)


def test_bytes_count_the_text_behind_the_tokens(built):
    """Split bytes = UTF-8 size of the documents fully in the file + the kept prefix of the tail-cut one."""
    layout, _ = built
    meta = json.loads((layout.shards / "meta.json").read_text())
    heldout = [json.loads(line) for line in (layout.shards / "heldout.jsonl").read_text().splitlines()]
    for domain in ("new", "old"):
        st = meta["splits"][f"{domain}/val"]
        full = sum(len(d["text"].encode()) for d in heldout if d["domain"] == domain)
        assert full - 4 * 64 <= st["bytes"] <= full  # the tail (< one block) costs at most a few bytes per token


def test_deterministic_and_independent_of_batching(tmp_path, texts, tokenizer_dir, built):
    """Same seed -> byte-identical files, whatever the batch size of encode_batch (pipelining keeps order)."""
    layout0, _ = built
    layout = _make_clean(tmp_path, texts)
    shards.run(_params(tokenizer_dir, batch_chars=20_000), layout)

    def digest(lay):
        return {p.name + p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(lay.shards.rglob("*")) if p.is_file() and p.name != "meta.json"}

    assert digest(layout) == digest(layout0)
    m0 = json.loads((layout0.shards / "meta.json").read_text())
    m1 = json.loads((layout.shards / "meta.json").read_text())
    assert m0["splits"] == m1["splits"]
    # the encode tasks on a pool of 2 processes (engine): the same bytes, meta included
    shards.run({**_params(tokenizer_dir), "engine": {"workers": 2}}, layout)
    assert digest(layout) == digest(layout0)
    assert (layout.shards / "meta.json").read_bytes() == (layout0.shards / "meta.json").read_bytes()


def test_a_document_held_out_by_rank_reaches_heldout_jsonl(tmp_path, texts, tokenizer_dir):
    """With a val fraction no score falls under, each domain's lowest-scoring document becomes val (``val_ids``): its
    record is read back from data/clean for heldout.jsonl, with 1 worker and with 2."""
    layout = _make_clean(tmp_path, texts)
    for workers in (1, 2):
        shards.run({**_params(tokenizer_dir, val_fraction=1e-9), "engine": {"workers": workers}}, layout)
        held = [json.loads(x) for x in (layout.shards / "heldout.jsonl").read_text().splitlines()]
        expected = set()
        for domain in ("new", "old"):
            docs = _docs(layout, domain)
            expected |= packing.val_ids([str(d["id"]) for d in docs], 7, 1e-9)
        assert {d["id"] for d in held} == expected and len(held) == 2
        by_id = {d["id"]: d for dom in ("new", "old") for d in _docs(layout, dom)}
        assert all(d == by_id[d["id"]] for d in held)


def test_a_split_too_small_for_one_block_is_an_error(tmp_path, texts, tokenizer_dir):
    layout = _make_clean(tmp_path, texts)
    with pytest.raises(DataError, match="does not fill one block"):
        shards.run(_params(tokenizer_dir, block_size=60_000), layout)


def test_config_and_input_errors(tmp_path, texts, tokenizer_dir):
    layout = _make_clean(tmp_path, texts)
    with pytest.raises(ConfigError, match="unknown key"):
        shards.run(_params(tokenizer_dir, blocksize=3), layout)
    with pytest.raises(ConfigError, match="val_fraction"):
        shards.run(_params(tokenizer_dir, val_fraction=0.9), layout)
    with pytest.raises(DataError, match="tokenizer.json"):
        shards.run(_params(tmp_path / "nowhere"), layout)
    with pytest.raises(DataError, match="manifest"):
        shards.run(_params(tokenizer_dir), Layout(tmp_path / "empty"))


# -- cpt.data.packing units ------------------------------------------------------------------------------------------------

def test_stream_split_equals_val_ids_and_larger_fractions_contain_smaller():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.choice([1, 2, 3, 5, 29, 200])
        ids = [f"src/{rng.randrange(10**9)}" for _ in range(n)]
        ids = list(dict.fromkeys(ids))
        f = rng.choice([0.0, 0.01, 0.05, 0.1, 0.3, 0.49])
        seed = rng.randrange(5)
        sp = packing.StreamSplit(seed, f)
        routed = [r for i in ids for r in sp.route(i, i)] + sp.finish()
        assert sorted(i for _, i in routed) == sorted(ids)  # every document exactly once
        val = {i for s, i in routed if s == "val"}
        assert val == packing.val_ids(ids, seed, f)
        if n >= 2 and f > 0:
            assert val and len(val) < n  # both splits exist
        if n == 1:
            assert not val
        bigger = packing.val_ids(ids, seed, min(0.49, f * 2 + 0.01))
        assert val <= bigger


def test_block_writer_drops_and_counts_the_tail(tokenizer_dir):
    tok = packing.load_tokenizer(tokenizer_dir)
    specials = packing.Specials(bos_id=1, eos_id=2)
    texts = ["The quick brown fox jumps over the lazy dog.", "Xin chào thế giới", "Ω ≈ ç √ ∫ ˜ µ ≤ ≥ ÷ " * 3]
    buf = io.BytesIO()
    w = packing.BlockWriter(buf, 16, np.uint16, specials, flush_tokens=16)
    encs = tok.encode_batch_fast(texts, add_special_tokens=False)
    for t, e in zip(texts, encs):
        w.add(e.ids, t, "xx")
    st = w.finish(tok)
    total = sum(len(e.ids) + 2 for e in encs)
    assert st.tokens == (total // 16) * 16 and st.tail_tokens == total % 16 and st.blocks == total // 16
    stream = np.frombuffer(buf.getvalue(), dtype="<u2")
    assert stream.size == st.tokens
    assert stream[0] == 1 and stream[len(encs[0].ids) + 1] == 2
    # bytes: the decoded text of the kept tokens (document by document), to within one character
    docs = _split_docs(stream, 1, 2)
    kept = [tok.decode(d) for d in docs]
    kept[-1] = kept[-1].rstrip("\ufffd")  # a cut inside a character's byte-fallback tokens
    assert kept[:-1] == texts[: len(kept) - 1] and texts[len(kept) - 1].startswith(kept[-1])
    assert 0 <= st.bytes - len("".join(kept).encode()) <= 4
    assert st.docs == len(docs)


def test_block_info_streamed_to_disk_is_what_memory_held(tokenizer_dir, tmp_path):
    """The shards stage streams block_info rows to a file (memory flat in corpus size) and writes the .npy from
    it: the same rows as the in-memory writer, and the same bytes as ``np.save``."""
    from cpt.data.shard_writer import _npy_from_raw

    tok = packing.load_tokenizer(tokenizer_dir)
    specials = packing.Specials(bos_id=1, eos_id=2)
    texts = [f"Xin chào thế giới {i} " * (i % 7 + 1) for i in range(60)]
    encs = tok.encode_batch(texts, add_special_tokens=False)
    raw = tmp_path / "info.raw"
    with open(raw, "wb") as info_fh:
        streamed = packing.BlockWriter(io.BytesIO(), 16, np.uint16, specials, flush_tokens=16, info_fh=info_fh)
        held = packing.BlockWriter(io.BytesIO(), 16, np.uint16, specials, flush_tokens=16)
        for t, e in zip(texts, encs):
            streamed.add(e.ids, t, "vi", e.offsets)
            held.add(e.ids, t, "vi", e.offsets)
        a, b = streamed.finish(), held.finish()
    assert a.blocks == b.blocks > 10 and a.block_info.size == 0
    _npy_from_raw(raw, tmp_path / "x.blocks.npy", a.blocks)
    expected = io.BytesIO()
    np.save(expected, b.block_info.astype("<i8"))
    assert (tmp_path / "x.blocks.npy").read_bytes() == expected.getvalue() and not raw.exists()
    with pytest.raises(DataError, match="block info"):
        raw.write_bytes(b"\0" * 17)
        _npy_from_raw(raw, tmp_path / "y.npy", 1)


def test_special_ids_follow_the_tokenizers_convention(tokenizer_dir, tmp_path):
    tok = packing.load_tokenizer(tokenizer_dir)
    assert packing.special_ids(tok, tokenizer_dir) == packing.Specials(bos_id=1, eos_id=2)
    assert packing.special_ids(tok, tokenizer_dir, add_bos=False).bos_id is None
    # a tokenizer whose post-processor adds nothing (GPT-2 style) gets no BOS
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    data["post_processor"] = None
    folder = tmp_path / "nobos"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    nobos = packing.load_tokenizer(folder)
    assert packing.special_ids(nobos, folder) == packing.Specials(bos_id=None, eos_id=2)
    with pytest.raises(DataError, match="EOS"):
        packing.special_ids(nobos, folder, eos_token="<nope>")


def test_token_dtype_by_vocab():
    assert packing.token_dtype(4096) == np.uint16
    assert packing.token_dtype(65535) == np.uint16
    assert packing.token_dtype(65536) == np.uint32
    assert packing.token_dtype(151_936) == np.uint32


def test_base_and_shards_import_without_the_data_and_ops_stack():
    """The GPU box has only the training stack: base, tiny, shards and packing must import (and tokenise) there."""
    from training_stack import run_without_data_and_ops_stack

    proc = run_without_data_and_ops_stack("import cpt.stages.base, cpt.stages.shards, cpt.data.packing, cpt.training.tiny\nprint('ok')\n")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_every_block_carries_its_language_and_the_bytes_behind_its_targets(built, tokenizer_dir):
    """Bits per byte must be exact on any subset of blocks (train-time eval scores a few per language), so each block
    says which language its targets are and how many UTF-8 bytes stand behind them (cpt.data.block_bytes)."""
    import sentencepiece as spm

    layout, _ = built
    meta = json.loads((layout.shards / "meta.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    per_lang: dict[str, list[float]] = {}
    for name, st in meta["splits"].items():
        info = np.load(layout.shards / f"{name}.blocks.npy")
        blocks = np.fromfile(layout.shards / f"{name}.bin", dtype="<u2").reshape(-1, 64)
        assert info.shape == (st["blocks"], 2) and info[:, 1].sum() <= st["bytes"]
        assert set(info[:, 0]) <= set(range(-1, len(st["lang_index"])))
        for (k, nbytes), block in zip(info.tolist(), blocks):
            if k < 0:
                continue
            # the targets' pieces spelled out as bytes (byte-fallback pieces are one byte, the dummy-prefix space
            # after BOS none) give the same count, up to a character split by either block edge
            spelled, prev = 0, None
            for t in block[1:].tolist():
                piece = sp.id_to_piece(t)
                if t not in (meta["bos_id"], meta["eos_id"]):
                    spelled += 1 if sp.is_byte(t) else len(piece.replace("\u2581", " ").encode("utf-8"))
                    spelled -= int(prev == meta["bos_id"] and piece.startswith("\u2581"))
                prev = t
            assert abs(spelled - nbytes) <= 6, (name, spelled, nbytes)
            per_lang.setdefault(st["lang_index"][k], []).append(nbytes / 63)
    # one bytes-per-token ratio for the whole split would be wrong for each language: they differ a lot
    assert {"vi", "zh", "en"} <= set(per_lang)
    assert np.mean(per_lang["zh"]) < 0.8 * np.mean(per_lang["vi"])
