"""Train-time bits per byte is exact on the blocks it scores, per language, and covers every language of the val
split (it used to score the first val blocks, all Vietnamese, and divide by the whole split's bytes per token)."""

from __future__ import annotations

import gzip
import itertools
import json
import math

import numpy as np
import pytest
import torch

from cpt.data.records import SourceInfo, write_manifest
from cpt.io import write_jsonl
from cpt.layout import Layout
from cpt.ops import tracking
from train_fixture import make_project, tiny_params


class Recorder(tracking.Tracker):
    def __init__(self):
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


def _texts(path, n, chars):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["text"][:chars] for line in itertools.islice(fh, n)]


def test_train_time_bpb_is_exact_per_language_on_blocks_spread_over_the_val_split(tmp_path, corpora, one_torch_thread):
    from cpt.stages import shards, train

    layout = Layout(make_project(tmp_path, corpora))
    sources = {
        "viwiki": ("vi", "new", _texts(corpora / "viwiki" / "viwiki.jsonl.gz", 40, 1500)),
        "zh": ("zh", "new", _texts(corpora / "zh_cmrc2018_contexts" / "cmrc2018_contexts.jsonl", 40, 600)),
        "en": ("en", "old", _texts(corpora / "en_gutenberg" / "en_gutenberg_books.jsonl.gz", 3, 20000)),
    }
    layout.clean.mkdir(parents=True)
    infos = []
    for name, (lang, domain, texts) in sources.items():
        write_jsonl(layout.clean / f"{name}.jsonl", [dict(id=f"{name}/{i}", source=name, lang=lang, domain=domain,
                                                          role="train", text=t) for i, t in enumerate(texts)])
        infos.append(SourceInfo(name, lang, domain, "train", f"{name}.jsonl", len(texts)))
    write_manifest(layout.clean, infos)
    shards.run({"seed": 1, "shards": {"tokenizer": "data/tokenizer", "block_size": 33, "val_fraction": 0.3}}, layout)

    rec = tracking.activate(Recorder())
    try:
        m = train.run(tiny_params(steps=4, eval_interval=4, ckpt_interval=4, eval_blocks=6), layout)
    finally:
        tracking.activate(tracking.Tracker())
    assert set(m["final_bpb"]) == {"vi", "zh", "en"}  # every language of the val splits, not just the first source
    assert {"bpb/new/vi", "bpb/new/zh", "bpb/old/en"} <= set(rec.metrics)
    assert m["final_bpb"]["vi"] == rec.metrics["bpb/new/vi"]

    # the same number, computed independently from the exported model and the shards
    from transformers import AutoModelForCausalLM

    from cpt.training.data import open_shards
    from cpt.training.measure import lang_rows

    model = AutoModelForCausalLM.from_pretrained(layout.model).eval()
    sh = open_shards(layout.shards)
    meta = sh.meta
    for domain, lang in (("new", "vi"), ("new", "zh"), ("old", "en")):
        split = sh.split(f"{domain}/val")
        rows = lang_rows(split, 6)[lang]
        assert len(rows) == 6 or len(rows) == int((split.block_info[:, 0] == split.langs.index(lang)).sum())
        assert rows[-1] > rows[0] + 1 or len(rows) <= 2  # spread, not the first blocks
        blocks = torch.from_numpy(split.blocks[rows].astype(np.int64))
        with torch.no_grad():
            logits = model(input_ids=blocks[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten(), reduction="none")
        text = ~torch.isin(blocks[:, 1:].flatten(), torch.tensor([meta["eos_id"], meta["bos_id"] or -1]))
        expected = float(nll[text].sum()) / math.log(2) / float(split.block_info[rows, 1].sum())
        assert m["final_bpb"][lang] == pytest.approx(expected, rel=1e-4), lang
