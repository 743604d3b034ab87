"""``tokenizer.guard: lexicon`` (the default): old-spelled new pieces only where no English word form changes.

Held-out English here is NTREX news plus ``tests/fixtures/english_unlike_books.txt`` (written for these tests, not
corpus text: names and places from many languages quoted in English, ASCII-spelled Vietnamese names, code, URLs,
numbers and dates), on a small English SentencePiece base shaped like the demo's tiny base and on a GPT-2-style
byte-level base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpt.data.records import iter_docs

from cpt.errors import DataError
from cpt.stages import shards, tokenizer as stage
from cpt.tok import guard as guard_mod
from cpt.tok import lexicon, sampling
from cpt.tok import spm_extend as se
from cpt.tok import spm_family

from tok_fixtures import byte_bpe, english_spm, make_clean, params, texts  # noqa: F401

FIXTURE = Path(__file__).parent / "fixtures" / "english_unlike_books.txt"


def with_fixture(texts: dict) -> dict:
    out = dict(texts)
    out["eval_en"] = texts["eval_en"] + [x for x in FIXTURE.read_text(encoding="utf-8").split("\n") if x.strip()]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("base_name", ["english_spm", "byte_bpe"])
def test_lexicon_guard_keeps_held_out_english_and_unlike_books(tmp_path, texts, base_name, request):
    base = request.getfixturevalue(base_name)
    layout = make_clean(tmp_path, with_fixture(texts), langs=("vi",))
    m = stage.run(params(base, languages=["vi"], vocab_size={"vi": 1000}, max_train_chars=300_000,
                         old_max_chars=600_000, check_lines=100), layout)
    assert m["lexicon_forms"] > 100_000 and m["lexicon_conflicts"] > 0
    # Nguyễn, Đà Nẵng, bánh mì: lines quoting Vietnamese are counted apart; every other fixture line is held out
    assert m["quoting_new_language_lines"] >= 3
    assert m["old_language_lines"] >= 300 + 25
    assert m["old_language_changed_lines"] == 0 and m["old_language_changed_docs"] == 0, m["old_language_changed_pieces"]
    assert m["roundtrip_failures"] == 0 and m["hf_mismatch_lines"] == 0
    assert m["languages"]["vi"]["tokens_per_word"] < m["languages"]["vi"]["tokens_per_word_base"]
    nt = json.loads((layout.tokenizer / "new_tokens.json").read_text())
    if base_name == "english_spm":  # distinct admits none of these; lexicon does where English never splits there
        assert sum(a["text"].strip().isascii() and a["text"].strip().isalpha() for a in nt["added"]) >= 3


def test_strict_fails_when_a_piece_that_changes_english_is_forced_in(tmp_path, texts, english_spm, monkeypatch):
    """Pieces that split rare fixture words differently are forced past the guard: the fixed point keeps those the
    chooser never shows, and strict mode refuses the tokenizer naming them."""
    layout = make_clean(tmp_path, with_fixture(texts), langs=("vi",))
    sp = se.processor(se.load_proto(english_spm / "tokenizer.model"))
    forced = []
    for word in ("Oyelaran", "Thiruvananthapuram", "Chaudhry", "Kierkegaard", "Ljubljana", "Habermas"):
        pieces = sp.encode(word, out_type=str)
        forced += [a + b for a, b in zip(pieces, pieces[1:])]
    choose = spm_family.choose

    def forcing(*args, **kw):
        kept, counts = choose(*args, **kw)
        return kept + [p for p in forced if p not in kept], counts

    monkeypatch.setattr(spm_family, "choose", forcing)
    with pytest.raises(DataError, match=r"held-out old-language lines and \d+ of \d+ documents encode differently"):
        stage.run(params(english_spm, languages=["vi"], vocab_size={"vi": 800}, max_train_chars=200_000,
                         old_max_chars=600_000, check_lines=50), layout)


def test_lexicon_conflicts_cover_every_form_and_context(english_spm):
    """Every adjacent-token concatenation of a form, with and without the ▁ marker, is a conflict, and no admitted
    piece changes a form: checked by merging the admitted pieces and encoding the forms."""
    base = se.load_proto(english_spm / "tokenizer.model")
    forms = lexicon.word_forms(2000, ["İstanbul Zürich naïve"])
    assert {"İstanbul", "Zürich", "ZÜRICH", "zürich", "Naïve", "THE", "The"} <= set(forms)
    conflicts = lexicon.spm_conflicts(base, forms)
    candidates = ["▁tr", "ong", "▁trong", "anh", "▁anh", "▁cho", "▁thanh", "▁nh", "ng", "▁the"]
    kept = se.reachable([p for p in candidates if p not in conflicts and p not in {x.piece for x in base.pieces}],
                        {x.piece for x in base.pieces if x.type == se.NORMAL})
    merged, _ = se.merge(base, kept)
    for prefix in (True, False):
        a = se.processor(base, add_dummy_prefix=prefix).encode(forms)
        b = se.processor(merged, add_dummy_prefix=prefix).encode(forms)
        assert a == b


def test_turkish_dotted_capital_i_does_not_break_the_letter_checks():
    """"İ".lower() is two code points (i + U+0307): the letter-block test took ord() of it and crashed on İstanbul."""
    test = guard_mod.in_letters_of(["The city of Istanbul.", "İzmir and İstanbul"])
    assert test("İstanbul") and not test("Trần")
    g = guard_mod.Guard(["İstanbul is a city in Turkey, the old Constantinople."] * 50,
                        {"vi": ["Thành phố Hồ Chí Minh là thành phố lớn nhất Việt Nam"] * 50}, mode="lexicon")
    assert g.allows("ành") and not g.allows("12")


def test_chooser_excludes_the_shards_held_out_documents(tmp_path, texts):
    """The old-language text the stage chooses pieces on leaves out what the shards stage holds out (same split,
    same seed), so the English that eval scores as held out stays unseen by the choice."""
    assert stage.SHARDS_VAL_FRACTION == shards.DEFAULTS["val_fraction"]
    layout = make_clean(tmp_path, texts, langs=("vi",))
    held = sampling.heldout_ids(layout.clean, 7, 0.05, "old")
    assert held
    docs = sampling.sample_docs(layout.clean, 7, 0, exclude=held, role="train", domain="old")
    every = sampling.sample_docs(layout.clean, 7, 0, role="train", domain="old")
    assert len(docs) == len(every) - len(held)
    # and the new-piece training text leaves out eval's heldout_<new lang> documents the same way
    held_new = sampling.heldout_ids(layout.clean, 7, 0.3, "new")
    texts_new = {d["id"]: d["text"] for d in iter_docs(layout.clean, role="train", domain="new")}
    assert held_new and len(held_new) < len(texts_new)
    lines = set(sampling.sample_lines(layout.clean, 7, 0, exclude=held_new, role="train", domain="new"))
    only_held = set(sampling.lines_of(texts_new[i] for i in held_new)) - set(
        sampling.lines_of(t for i, t in texts_new.items() if i not in held_new))
    assert only_held and not only_held & lines
