"""Stage ingest: every bad-input case lands in rejects.jsonl with file, line and reason; config errors fail before any
work; units, formats and sampling behave; real corpora slices ingest as documented in their SOURCE.md."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from cpt.stages import ingest
from cpt.errors import ConfigError, DataError
from cpt.io import read_jsonl
from cpt.layout import Layout
from cpt.data.records import iter_docs, read_manifest


def _params(corpus: Path, *sources: dict, seed: int = 1) -> dict:
    return {"seed": seed, "ingest": {"corpus_dir": str(corpus), "sources": list(sources)}}


def _src(name: str, path: str, **kw) -> dict:
    return {"name": name, "path": path, "lang": "vi", "domain": "new", "role": "train", **kw}


@pytest.fixture
def bad_corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    lines = [
        json.dumps({"id": "a", "text": "một văn bản tốt"}).encode(),                 # 1 ok
        b'{"id": "b", "text": "h\xff\xfeng"}',                                         # 2 invalid UTF-8
        b'{"id": "c", "text": "unterminated',                                          # 3 not JSON
        json.dumps({"id": "d", "body": "no text field"}).encode(),                     # 4 no text field
        b"",                                                                           # 5 blank: formatting only
        json.dumps(["not", "an", "object"]).encode(),                                  # 6 not an object
        json.dumps({"id": "e", "text": "   "}).encode(),                               # 7 empty text
        json.dumps({"id": "a", "text": "same id again"}).encode(),                     # 8 duplicate id
        json.dumps({"id": "f", "text": 42}).encode(),                                  # 9 text not a string
        json.dumps({"text": "no id: numbered"}).encode(),                              # 10 ok, id from position
    ]
    (d / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return d


def test_bad_records_are_rejected_with_file_line_and_reason(tmp_path, bad_corpus):
    layout = Layout(tmp_path / "proj")
    m = ingest.run(_params(bad_corpus, _src("bad", "bad.jsonl")), layout)
    docs = list(iter_docs(layout.raw, name="bad"))
    assert [d["id"] for d in docs] == ["bad/a", "bad/1"]
    assert all(set(d) == {"id", "source", "lang", "domain", "role", "text"} for d in docs)
    rejects = list(read_jsonl(layout.raw / "rejects.jsonl"))
    got = {(r["line"], r["reason"]) for r in rejects}
    assert got == {(2, "invalid UTF-8"), (3, "not JSON"), (4, "no text field"), (6, "not a JSON object"),
                   (7, "empty text"), (8, "duplicate id"), (9, "text not a string")}
    assert all(r["source"] == "bad" and r["file"].endswith("bad.jsonl") for r in rejects)
    assert m["rejected"] == 7 and m["docs"] == 2
    assert m["by_source"]["bad"]["rejected"]["not JSON"] == 1
    assert read_manifest(layout.raw)[0].docs == 2


def test_truncated_gzip_keeps_what_was_read_and_rejects_the_rest(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    payload = "".join(json.dumps({"id": i, "text": f"văn bản số {i} " * 20}) + "\n" for i in range(2000))
    blob = gzip.compress(payload.encode())
    (d / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    layout = Layout(tmp_path / "p")
    m = ingest.run(_params(d, _src("cut", "cut.jsonl.gz")), layout)
    assert 0 < m["docs"] < 2000
    (rej,) = list(read_jsonl(layout.raw / "rejects.jsonl"))
    assert rej["reason"] == "corrupt file" and rej["line"] == m["docs"] + 1


def test_txt_units_and_invalid_utf8_line(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "wt.txt").write_bytes(
        b" \n = Alpha = \n \n Alpha text .\n \n = = Section = = \n more alpha\n = Beta = \n beta \xc3\x28 bad\n beta text\n")
    (d / "para.txt").write_text("p one\nstill one\n\n\np two\n")
    (d / "lines.txt").write_text("s1\n\ns2\n")
    layout = Layout(tmp_path / "p")
    m = ingest.run(_params(d, _src("wt", "wt.txt", unit="wikitext"), _src("para", "para.txt", unit="blank"),
                           _src("lines", "lines.txt", unit="line"), _src("whole", "para.txt", unit="file")), layout)
    wt = [x["text"] for x in iter_docs(layout.raw, name="wt")]
    assert len(wt) == 2 and wt[0].startswith(" = Alpha = ") and "= = Section = =" in wt[0]
    assert wt[1].startswith(" = Beta = ") and "beta text" in wt[1] and "bad" not in wt[1]
    assert [x["text"] for x in iter_docs(layout.raw, name="para")] == ["p one\nstill one", "p two"]
    assert [x["text"] for x in iter_docs(layout.raw, name="lines")] == ["s1", "s2"]
    assert [x["text"] for x in iter_docs(layout.raw, name="whole")] == ["p one\nstill one\n\n\np two"]
    assert m["rejected_by_reason"] == {"invalid UTF-8": 1}
    (rej,) = list(read_jsonl(layout.raw / "rejects.jsonl"))
    assert rej["line"] == 9 and rej["source"] == "wt"


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = tmp_path / "c"
    d.mkdir()
    pq.write_table(pa.table({"id": ["x", "y", "z"], "content": ["một", None, "ba"]}), d / "t.parquet")
    layout = Layout(tmp_path / "p")
    m = ingest.run(_params(d, _src("pq", "t.parquet", text_field="content")), layout)
    assert [x["id"] for x in iter_docs(layout.raw, name="pq")] == ["pq/x", "pq/z"]
    assert m["rejected_by_reason"] == {"no text field": 1}


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (_src("m", "missing/*.jsonl"), DataError, ["'m'", "no file matches"]),
        (_src("u", "x.csv"), DataError, ["'u'", "unknown format"]),
        ({**_src("r", "bad.jsonl"), "role": "test"}, ConfigError, ["'r'", "role"]),
        ({**_src("k", "bad.jsonl"), "txt_field": "t"}, ConfigError, ["'k'", "unknown keys"]),
        ({"name": "h", "lang": "vi", "domain": "new", "role": "train"}, ConfigError, ["'h'", "path"]),
        (_src("bad", "bad.jsonl"), ConfigError, ["duplicate"]),
    ],
)
def test_config_errors_name_the_source_before_any_work(tmp_path, bad_corpus, bad, error, words):
    (bad_corpus / "x.csv").write_text("a,b\n")
    layout = Layout(tmp_path / "p")
    with pytest.raises(error) as exc:
        ingest.run(_params(bad_corpus, _src("bad", "bad.jsonl"), bad), layout)
    assert all(w in str(exc.value) for w in words), str(exc.value)
    assert not layout.raw.exists()  # nothing was read or written


def test_uniform_sample_is_seeded_order_preserving_and_unlike_head(tmp_path, corpora):
    def ids(seed, sample):
        layout = Layout(tmp_path / f"{seed}{sample}")
        src = {"name": "v", "path": "ntrex128/newstest2019-ref.vie.txt", "lang": "vi", "domain": "new",
               "role": "eval", "unit": "line", "max_docs": 50, "sample": sample}
        ingest.run(_params(corpora, src, seed=seed), layout)
        return [int(x["id"].split("/")[1]) for x in iter_docs(layout.raw, name="v")]

    a, b, c, head = ids(1, "uniform"), ids(1, "uniform"), ids(2, "uniform"), ids(1, "first")
    assert a == b and len(a) == 50 and a == sorted(a)
    assert a != c
    assert head == list(range(50))
    assert max(a) > 1000  # spread over the whole file, not the head


def test_real_corpora_slices(tmp_path, corpora):
    layout = Layout(tmp_path / "p")
    m = ingest.run(_params(
        corpora,
        {"name": "wt2", "path": "en_wikitext2/test.txt", "lang": "en", "domain": "old", "role": "eval",
         "unit": "wikitext"},
        {"name": "ntrex_vi", "path": "ntrex128/newstest2019-ref.vie.txt", "lang": "vi", "domain": "new",
         "role": "eval", "unit": "line"},
        {"name": "viwiki", "path": "viwiki/viwiki.jsonl.gz", "lang": "vi", "domain": "new", "role": "train",
         "max_docs": 20},
    ), layout)
    assert m["by_source"]["wt2"]["docs"] == 62  # SOURCE.md: 62 articles in test.txt
    assert m["by_source"]["ntrex_vi"]["docs"] == 1997
    assert m["by_source"]["viwiki"]["docs"] == 20 and m["rejected"] == 0
    first = next(iter_docs(layout.raw, name="viwiki"))
    assert first["id"] == "viwiki/viwiki-00000" and first["role"] == "train" and first["lang"] == "vi"
    assert [s.name for s in read_manifest(layout.raw)] == ["wt2", "ntrex_vi", "viwiki"]


def test_hf_source_streams_a_packaged_builder(tmp_path, corpora):
    pytest.importorskip("datasets")
    layout = Layout(tmp_path / "p")
    src = {"name": "zh", "hf": "json", "data_files": "zh_cmrc2018_contexts/cmrc2018_contexts.jsonl",
           "lang": "zh", "domain": "new", "role": "train", "max_docs": 5}
    m = ingest.run(_params(corpora, src), layout)
    docs = list(iter_docs(layout.raw, name="zh"))
    assert m["docs"] == 5 and docs[0]["id"] == "zh/cmrc2018-dev-00000" and m["by_source"]["zh"]["format"] == "hf"


def test_cli_reports_a_missing_source_in_one_line(tmp_path, capsys):
    from cpt.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({**_params(tmp_path, _src("gone", "nowhere.jsonl")), "tracking": {"enabled": False}}))
    assert main(["ingest", "-p", str(params), "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'gone'" in err[0] and "no file matches" in err[0]


def test_squad_json_gives_one_document_per_distinct_context(tmp_path, corpora):
    """XQuAD-style sources: paragraphs become eval documents (so decontamination sees them); repeated contexts
    count once; a malformed article is a reject with its reason, not a crash."""
    import json as _json

    from cpt.data.sources import Source, read_squad

    squad = {"data": [
        {"title": "A", "paragraphs": [{"context": "Một đoạn văn.", "qas": []}, {"context": "Một đoạn văn.", "qas": []},
                                      {"qas": []}]},
        {"title": "B"},
    ]}
    path = tmp_path / "x.json"
    path.write_text(_json.dumps(squad, ensure_ascii=False), encoding="utf-8")
    src = Source(name="x", lang="vi", domain="new", role="eval", path=str(path), files=[path])
    items = list(read_squad(path, src))
    docs = [i for i in items if isinstance(i, tuple)]
    rejects = [i for i in items if not isinstance(i, tuple)]
    assert docs == [(1, "A/0", "Một đoạn văn.")]
    assert sorted(r.reason for r in rejects) == ["no paragraphs", "no text field"]

    real = corpora / "xquad" / "xquad.vi.json"
    real_docs = [i for i in read_squad(real, Source(name="xq", lang="vi", domain="new", role="eval", path=str(real),
                                                       files=[real])) if isinstance(i, tuple)]
    assert len(real_docs) == 240  # SOURCE.md: 240 paragraphs, all distinct
