"""Eval sets never overlap the training shards.

The check decodes the training shards (flat token ids, documents joined by EOS, the architecture's format) back into
documents and looks up every evaluation and held-out document. What makes the test able to fail: the same project
with a broken role barrier (three NTREX sentences routed into the new-language training stream) must be caught by
name, and the stage must refuse to report numbers on it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpt.errors import DataError
from cpt.evaluation.overlap import check_overlap
from cpt.stages.eval import config
from cpt.evaluation import overlap
from test_eval import make_project


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_clean_pipeline_slice_has_no_eval_document_in_the_training_shards(tmp_path, corpora):
    layout = make_project(tmp_path, corpora)
    result = check_overlap(layout, config({}))
    meta = json.loads((layout.shards / "meta.json").read_text())
    assert result["shard_docs_checked"] == meta["splits"]["new/train"]["docs"] + meta["splits"]["old/train"]["docs"]
    # every token of the streams but the EOS separators (one per document) was looked at
    assert result["shard_tokens_checked"] == sum(s["tokens"] - s["docs"] for s in meta["splits"].values())
    assert result["eval_docs_indexed"] == 120 and result["heldout_docs_indexed"] == 10
    assert result["eval_docs_in_train_shards"] == 0 and result["eval_docs_in_train_records"] == 0
    assert result["heldout_docs_in_train_shards"] == 0


def test_a_broken_role_barrier_is_caught_by_name_and_stops_the_stage(tmp_path, corpora):
    layout = make_project(tmp_path, corpora, leak=True)
    with pytest.raises(DataError, match=r"ntrex_vi': 3"):
        check_overlap(layout, config({}))
    result = check_overlap(layout, config({"eval": {"overlap": {"fail": False}}}))
    assert result["eval_docs_in_train_shards"] == 3 and result["eval_docs_in_train_records"] == 0


def test_index_matches_text_modulo_spacing_and_unicode_form_and_token_ids_exactly():
    index = overlap.OverlapIndex()
    index.add("ntrex_vi", ["Hà Nội  là thủ đô."], encode=lambda texts: [[ord(c) for c in t] for t in texts])
    _, leaks, _ = index.find_texts(["Ha\u0300 Nội là   thủ đô.", "something else"])
    assert leaks == {"ntrex_vi": 1}  # NFD and other spacing: still the same document
    segs = [np.array([ord(c) for c in "Hà Nội  là thủ đô."]), np.array([1, 2, 3])]
    _, leaks, _ = index.find_segments(segs)
    assert leaks == {"ntrex_vi": 1}


def test_shard_segments_split_at_eos_and_drop_bos(tmp_path):
    path = tmp_path / "train.bin"
    np.array([1, 5, 6, 2, 1, 7, 2, 1, 8], dtype="<u2").tofile(path)  # BOS=1, EOS=2; last doc cut by the tail
    segs = [s.tolist() for s in overlap.shard_segments(path, "uint16", 2, [1])]
    assert segs == [[5, 6], [7], [8]]


def _real_shards(layout, params):
    """Run the real `shards` stage on the project's clean folder, with the cpt fixture's tokenizer."""
    import shutil

    from cpt.stages import shards

    shutil.rmtree(layout.shards / "new", ignore_errors=True)
    shutil.rmtree(layout.shards / "old", ignore_errors=True)
    return shards.run(params, layout)


@pytest.mark.slow
def test_real_shards_stage_output_passes_and_a_decontamination_miss_is_caught(tmp_path, corpora):
    from cpt.io import read_jsonl, write_jsonl
    from cpt.data.records import read_manifest

    layout = make_project(tmp_path, corpora)
    params = {"seed": 3, "shards": {"tokenizer": str(layout.model), "block_size": 32, "val_fraction": 0.1}}
    _real_shards(layout, params)
    cfg = config({"eval": {"heldout": "data/shards/heldout.jsonl"}})
    clean = check_overlap(layout, cfg)
    assert clean["shard_docs_checked"] > 30 and clean["eval_docs_in_train_shards"] == 0
    assert clean["heldout_docs_in_train_shards"] == 0 and clean["heldout_docs_indexed"] > 0

    # Upstream decontamination misses: two NTREX sentences become whole training documents of viwiki.
    ntrex = [d["text"] for d in read_jsonl(layout.clean / "ntrex_vi.jsonl")][:2]
    rows = list(read_jsonl(layout.clean / "viwiki.jsonl"))
    rows[3:3] = [dict(rows[0], id=f"viwiki/leak{i}", text=t) for i, t in enumerate(ntrex)]
    write_jsonl(layout.clean / "viwiki.jsonl", rows)
    assert any(s.name == "viwiki" for s in read_manifest(layout.clean))
    _real_shards(layout, params)
    leaked = check_overlap(layout, config({"eval": {"overlap": {"fail": False}}}))
    # both are found in the clean train records; in the shards, those the train/val split did not hold out
    held_out = sum("leak" in d["id"] for d in read_jsonl(layout.shards / "heldout.jsonl"))
    assert leaked["eval_docs_in_train_records"] == 2
    assert leaked["eval_docs_in_train_shards"] == 2 - held_out
    with pytest.raises(DataError, match="ntrex_vi"):
        check_overlap(layout, cfg)


def test_prefix_prefilter_never_hides_a_leak_behind_leading_whitespace_or_a_long_document():
    long_doc = "  \n " + "Một câu rất dài. " * 500
    index = overlap.OverlapIndex()
    index.add("heldout", [long_doc, "ngắn"])
    checked, leaks, _ = index.find_texts([long_doc.strip(), " ngắn ", long_doc + " khác", "x"])
    assert checked == 4 and leaks == {"heldout": 2}
