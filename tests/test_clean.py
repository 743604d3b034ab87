"""Stage clean: normalisation, filters, exact/near dedup and decontamination, on real corpus slices where it matters
(viwiki's templated stubs are the near-duplicates; NTREX sentences are the eval text to keep out of training)."""

from __future__ import annotations

import gzip
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from cpt.data import dedup, filters, textnorm
from cpt.stages import clean
from cpt.errors import ConfigError
from cpt.io import read_jsonl, write_jsonl
from cpt.layout import Layout
from cpt.data.records import SourceInfo, iter_docs, read_manifest, write_manifest

# Real viwiki articles (line numbers in viwiki.jsonl.gz): templated commune stubs of Bắc Yên district, year stubs
# of the form "Năm N là một năm trong lịch Julius", and ordinary articles that must survive.
COMMUNES_NAMED = [979, 1202, 1266, 2611, 2767, 2869, 3013, 7814]  # "Xã <name> có diện tích ..."
COMMUNES_PLAIN = [3742, 4914, 4915, 5641, 6677, 6780, 7316]  # "Xã có diện tích ...": one template
ORDINARY = [2, 5, 40, 200, 1000, 3000, 4000]


@pytest.fixture(scope="session")
def viwiki(corpora) -> dict[int, dict]:
    want = set(COMMUNES_NAMED + COMMUNES_PLAIN + ORDINARY)
    out, years = {}, []
    with gzip.open(corpora / "viwiki" / "viwiki.jsonl.gz", "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i in want:
                out[i] = json.loads(line)
            elif len(years) < 6 and " là một năm trong lịch Julius" in line[:200]:
                out[i] = json.loads(line)
                years.append(i)
    out["years"] = years  # type: ignore[index]
    return out


@pytest.fixture(scope="session")
def ntrex_vi(corpora) -> list[str]:
    return (corpora / "ntrex128" / "newstest2019-ref.vie.txt").read_text(encoding="utf-8").splitlines()


def _raw(layout: Layout, sources: dict[str, tuple[str, str, list[str]]]) -> None:
    """Write data/raw as ingest would: {name: (lang, role, texts)}."""
    infos = []
    for name, (lang, role, texts) in sources.items():
        rows = [{"id": f"{name}/{i}", "source": name, "lang": lang, "domain": "new", "role": role, "text": t}
                for i, t in enumerate(texts)]
        write_jsonl(layout.raw / f"{name}.jsonl", rows)
        infos.append(SourceInfo(name, lang, "new", role, f"{name}.jsonl", len(rows)))
    write_manifest(layout.raw, infos)


# ---------------------------------------------------------------- normalisation


def test_nfd_and_nfc_inputs_clean_to_identical_bytes(ntrex_vi):
    for line in ntrex_vi[:200]:
        nfd = unicodedata.normalize("NFD", line)
        assert nfd != line or line.isascii()
        a, b = textnorm.normalize(nfd), textnorm.normalize(line)
        assert a.encode() == b.encode()
        assert textnorm.normalize(a) == a  # idempotent


def test_controls_and_whitespace():
    text = "\ufeffa\u200bb\x00c \t d\u00a0\u00a0e  \r\n  f \r\n\r\n\r\n\r\ng\u3000h\x85"
    assert textnorm.normalize(text, wiki=False) == "abc d e\nf\n\ng h"


def test_wiki_reference_sections_dropped_content_headings_kept(viwiki):
    raw = viwiki[5]["text"]  # ".edu": "== Lịch sử ==" content, then references/external links
    assert "== Tham khảo ==" in raw or "== Liên kết ngoài ==" in raw
    out = textnorm.normalize(raw)
    assert "==" not in out and "Tham khảo" not in out and "Liên kết ngoài" not in out
    assert "\nLịch sử\n" in out and "Ra đời vào tháng 1, năm 1985" in out
    doc = "Intro.\n== Xem thêm ==\nlink a\n=== Sub ===\nlink b\n== Lịch sử ==\nProse.\n== Tham khảo ==\nref"
    assert textnorm.normalize(doc) == "Intro.\nLịch sử\nProse."
    messy = "Intro.\r\n  == Xem thêm ==  \r\nlink a\n== Lịch sử ==\t\nProse.\r\n== Tham khảo ==\r\nref"
    assert textnorm.normalize(messy) == "Intro.\nLịch sử\nProse."


# ---------------------------------------------------------------- filters


def test_script_checks(viwiki, ntrex_vi, corpora):
    th = lambda lang: filters.thresholds({}, lang)  # noqa: E731
    vi = textnorm.normalize(viwiki[5]["text"])
    assert filters.check(vi, "vi", th("vi")) is None
    english = "This article is written in English and only pretends to be Vietnamese. " * 5
    assert filters.check(english, "vi", th("vi"))[0] == "script"
    zh = json.loads((corpora / "zh_cmrc2018_contexts" / "cmrc2018_contexts.jsonl").open().readline())["text"]
    assert filters.check(zh, "zh", filters.thresholds({"zh": {"min_script_ratio": 0.6}}, "zh")) is None
    assert filters.check(zh, "ja", th("ja"))[0] == "script"  # Chinese labelled ja: no kana
    assert filters.check(zh, "ko", th("ko"))[0] == "script"
    assert filters.check(vi, "zh", th("zh"))[0] == "script"
    assert filters.script_ratio("한국어 문장입니다", "ko") == 1.0


def test_length_digit_symbol_and_repeated_line_filters():
    th = filters.thresholds({"default": {"min_chars": 10}}, "en")
    assert filters.check("short", "en", th)[0] == "min_chars"
    assert filters.check("1234 5678 9012 3456 " * 5 + "words", "en", th)[0] == "max_digit_ratio"
    assert filters.check("#### $$$$ %%%% &&&& **** words", "en", th)[0] == "max_symbol_ratio"
    assert filters.check("menu line\n" * 8 + "one real line", "en", th)[0] == "max_dup_line_ratio"
    assert filters.check("A perfectly ordinary English sentence here.", "en", th) is None


# ---------------------------------------------------------------- MinHash


def test_vectorised_token_hashes_match_the_regex_tokenizer(viwiki, ntrex_vi):
    texts = [textnorm.normalize(d["text"]) for k, d in viwiki.items() if k != "years"] + ntrex_vi[:100]
    for mode in ("word", "char"):
        for text in texts:
            toks = dedup.token_hashes(text, mode)
            words = dedup.tokenize(text, mode)
            assert [toks.text(i, 1) for i in range(len(toks))] == words
            # equal tokens <=> equal hashes (no collisions among these, every repeat found)
            first: dict[str, int] = {}
            for w, h in zip(words, toks.hashes(norm_numbers=False).tolist()):
                assert first.setdefault(w, h) == h
            assert len(set(first.values())) == len(first)
    t = dedup.token_hashes("Năm 1999 và năm 2008, dân số 4.764", "word")
    h = t.hashes(norm_numbers=True)
    assert h[1] == h[4] == h[7] == h[8] and t.hashes(norm_numbers=False)[1] != t.hashes(norm_numbers=False)[4]


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    mh = dedup.MinHasher(num_perm=256, seed=3)
    for true_j in (0.2, 0.5, 0.8, 0.95):
        common = rng.integers(0, 2**63, size=int(1000 * true_j), dtype=np.uint64)
        a = np.concatenate([common, rng.integers(0, 2**63, size=500 - len(common) // 2, dtype=np.uint64)])
        b = np.concatenate([common, rng.integers(0, 2**63, size=500 - len(common) // 2, dtype=np.uint64)])
        j = len(common) / (len(common) + 2 * (500 - len(common) // 2))
        sig = mh.signatures(iter([a, b]), 2)
        assert abs((sig[0] == sig[1]).mean() - j) < 0.08, (true_j, j)


def test_minhash_batches_agree_with_one_doc_at_a_time():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 2**63, size=n, dtype=np.uint64) for n in (1, 7, 3000, 0, 50, 10000)]
    small = dedup.MinHasher(64, seed=5, batch_shingles=64).signatures(iter(docs), len(docs))
    one = np.stack([dedup.MinHasher(64, seed=5).signatures(iter([d]), 1)[0] for d in docs])
    assert (small == one).all()
    assert (small[3] == 0xFFFFFFFF).all()  # the empty document


def test_char_shingles_catch_edited_chinese_duplicate():
    base = "《战国无双3》是由光荣和ω-force开发的战国无双系列的正统第三续作。本作以三大故事为主轴，分别是以武田信玄等人为主的关东三国志。" * 3
    edited = base.replace("第三", "第3")
    other = "梅雨是北海道与小笠原诸岛以外的日本、朝鲜半岛南部、中国南部至长江流域沿海部以及台湾等东亚地区特有的气象现象。" * 3
    sh = [dedup.shingles(dedup.token_hashes(t, "char").hashes(), 5) for t in (base, edited, other)]
    sig = dedup.MinHasher(128, seed=1).signatures(iter(sh), 3)
    res = dedup.near_duplicates(sig, *dedup.lsh_params(0.6, 128), threshold=0.8)
    assert res.root.tolist() == [0, 0, 2]


# ---------------------------------------------------------------- the stage on real slices


def _clean_params(**over) -> dict:
    return {"seed": 7, "clean": {"filters": {"vi": {"min_chars": 50}}, **over}}


def test_templated_viwiki_stubs_are_near_duplicates(tmp_path, viwiki, ntrex_vi):
    years = viwiki["years"]
    order = COMMUNES_PLAIN + ORDINARY + COMMUNES_NAMED + years
    layout = Layout(tmp_path)
    _raw(layout, {
        "viwiki": ("vi", "train", [viwiki[i]["text"] for i in order]),
        "ntrex_vi": ("vi", "eval", ntrex_vi[:50]),
    })
    m = clean.run(_clean_params(), layout)
    kept = [d["id"] for d in iter_docs(layout.clean, name="viwiki")]
    pos = {i: f"viwiki/{k}" for k, i in enumerate(order)}
    # one "Xã có diện tích" commune survives: the first in input order; the other six point at it
    assert pos[COMMUNES_PLAIN[0]] in kept
    assert not any(pos[i] in kept for i in COMMUNES_PLAIN[1:])
    # year stubs ("Năm N là một năm trong lịch Julius") collapse to their first one
    assert pos[years[0]] in kept and not any(pos[i] in kept for i in years[1:])
    # ordinary articles survive
    assert all(pos[i] in kept for i in ORDINARY)
    q = {r["id"]: r for r in read_jsonl(layout.clean / "quarantine.jsonl")}
    for i in COMMUNES_PLAIN[1:]:
        assert q[pos[i]]["reason"] in ("near_duplicate", "exact_duplicate")
        assert q[pos[i]]["ref"] == pos[COMMUNES_PLAIN[0]]
    assert m["near_duplicates"] + m["exact_duplicates"] >= len(COMMUNES_PLAIN) - 1 + len(years) - 1
    # eval docs: all kept (NTREX lines are shorter than min_chars), never deduplicated
    assert m["by_source"]["ntrex_vi"]["docs_out"] == 50
    assert m["docs_in"] == m["docs_out"] + len(q)  # nothing dropped silently
    assert sum(m["rejected"].values()) + m["exact_duplicates"] + m["near_duplicates"] + m["decontaminated"] == len(q)


def test_decontamination_exact_dedup_and_determinism(tmp_path, viwiki, ntrex_vi):
    article = textnorm.normalize(viwiki[200]["text"])
    sentence = next(s for s in ntrex_vi if len(s.split()) > 25)
    contaminated = article + "\n" + sentence
    short_eval = next(s for s in ntrex_vi[:300] if len(s.split()) < 12 and len(s) > 25)
    texts = [article, unicodedata.normalize("NFD", article), contaminated, viwiki[1000]["text"],
             short_eval + " " * 3]
    layout = Layout(tmp_path / "a")
    _raw(layout, {"viwiki": ("vi", "train", texts), "ntrex_vi": ("vi", "eval", ntrex_vi[:300]),
                  "other": ("vi", "train", [article + "  "])})
    params = _clean_params(filters={"vi": {"min_chars": 20}})
    m = clean.run(params, layout)
    q = {r["id"]: r for r in read_jsonl(layout.clean / "quarantine.jsonl")}
    assert q["viwiki/1"]["reason"] == "exact_duplicate" and q["viwiki/1"]["ref"] == "viwiki/0"  # NFD == NFC
    assert q["other/0"]["reason"] == "exact_duplicate"  # across sources
    assert q["viwiki/2"]["reason"] == "contaminated" and "ntrex_vi" in q["viwiki/2"]["detail"]
    assert q["viwiki/4"]["reason"] == "contaminated"  # a whole short eval sentence, by text hash
    assert [d["id"] for d in iter_docs(layout.clean, name="viwiki")] == ["viwiki/0", "viwiki/3"]
    assert m["decontaminated"] == 2 and m["exact_duplicates"] == 2
    assert m["by_source"]["other"]["exact_duplicates"] == 1
    assert [s.docs for s in read_manifest(layout.clean)] == [2, 300, 0]
    # same input, same seed: byte-identical outputs
    layout2 = Layout(tmp_path / "b")
    _raw(layout2, {"viwiki": ("vi", "train", texts), "ntrex_vi": ("vi", "eval", ntrex_vi[:300]),
                   "other": ("vi", "train", [article + "  "])})
    clean.run(params, layout2)
    files = sorted(p.relative_to(layout.clean) for p in layout.clean.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(layout2.clean) for p in layout2.clean.rglob("*") if p.is_file())
    assert len(files) == 5  # three sources, one shard each (an empty one for `other`), quarantine, manifest
    for name in files:
        assert (layout.clean / name).read_bytes() == (layout2.clean / name).read_bytes()


def test_filter_drops_are_counted_per_source(tmp_path, ntrex_vi):
    layout = Layout(tmp_path)
    english = "This is an English paragraph that was mislabelled as Vietnamese by a careless crawler. " * 4
    _raw(layout, {"vi": ("vi", "train", [english, "ngắn", " \u200b "]), "ev": ("vi", "eval", ["x", "\x00"])})
    m = clean.run(_clean_params(), layout)
    assert m["rejected"] == {"empty": 2, "min_chars": 1, "script": 1}
    assert m["by_source"]["ev"] == {**m["by_source"]["ev"], "docs_in": 2, "docs_out": 1}
    reasons = {r["id"]: (r["reason"], r["detail"]) for r in read_jsonl(layout.clean / "quarantine.jsonl")}
    assert reasons["vi/0"][0] == "script" and "Vietnamese letters" in reasons["vi/0"][1]


def test_unknown_clean_keys_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        clean.run({"clean": {"dedupe": {}}}, Layout(tmp_path))
    with pytest.raises(ConfigError, match="min_char"):
        clean.run({"clean": {"filters": {"vi": {"min_char": 3}}}}, Layout(tmp_path))
