"""Stage validate: the GX gate passes on cleaned real data, writes Data Docs, and fails naming the expectation and
example ids when eval text leaks into training, text is not NFC, or a source loses too many documents."""

from __future__ import annotations

import json
import unicodedata

import pytest

from cpt.stages import clean, ingest, validate
from cpt.errors import ValidationFailed
from cpt.data.records import iter_docs, read_manifest
from cpt.data.shardio import LineWriter, read_records
from cpt.layout import Layout


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory, corpora):
    """A small real pipeline: viwiki + ko + NTREX eval, ingested and cleaned."""
    layout = Layout(tmp_path_factory.mktemp("validate"))
    params = {
        "seed": 3,
        "ingest": {"corpus_dir": str(corpora), "sources": [
            {"name": "viwiki", "path": "viwiki/viwiki.jsonl.gz", "lang": "vi", "domain": "new", "role": "train",
             "max_docs": 120},
            {"name": "ko", "path": "ko_ud_kaist/ko_kaist_dev_test_docs.jsonl", "lang": "ko", "domain": "new",
             "role": "train"},
            {"name": "ntrex_vi", "path": "ntrex128/newstest2019-ref.vie.txt", "lang": "vi", "domain": "new",
             "role": "eval", "unit": "line", "max_docs": 300},
        ]},
        "clean": {},
        "validate": {},
    }
    ingest.run(params, layout)
    clean.run(params, layout)
    return layout, params


def test_gate_passes_on_clean_data_and_writes_data_docs(cleaned):
    layout, params = cleaned
    m = validate.run(params, layout)
    assert m["success"] is True and m["failed"] == 0
    names = set(m["expectations"])
    assert {"text_not_null", "text_is_nfc", "train_text_hash_unique", "no_eval_text_in_train", "train_vi_length",
            "train_vi_script_ratio", "train_ko_script_ratio", "rows_viwiki", "train_keep_ratio"} <= names
    assert m["expectations"]["no_eval_text_in_train"]["element_count"] > 0
    assert (layout.reports / "data_docs" / "index.html").exists()
    json.dumps(m)  # metrics must be plain JSON


def test_gate_fails_naming_expectations_and_examples(cleaned):
    layout, params = cleaned
    (path,) = next(s for s in read_manifest(layout.clean) if s.name == "viwiki").paths(layout.clean)
    original = path.read_bytes()
    try:
        docs = list(read_records(path))
        eval_text = next(iter_docs(layout.clean, name="ntrex_vi"))["text"]
        docs[3]["text"] = eval_text  # an eval sentence leaked into training
        docs[5]["text"] = unicodedata.normalize("NFD", docs[5]["text"])  # not NFC
        writer = LineWriter(path)
        for doc in docs:
            writer.write(doc)
        writer.close()
        with pytest.raises(ValidationFailed) as exc:
            validate.run({**params, "validate": {"row_counts": {"ko": [100, 200]}}}, layout)
        msg = str(exc.value)
        assert "no_eval_text_in_train" in msg and docs[3]["id"] in msg
        assert "text_is_nfc" in msg and docs[5]["id"] in msg
        assert "rows_ko" in msg
        assert "train_text_hash_unique" not in msg
    finally:
        path.write_bytes(original)
