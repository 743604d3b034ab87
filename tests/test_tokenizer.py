"""Stage `tokenizer`: id stability, old-language invariance on held-out text, round trip in five languages,
AutoTokenizer parity, both base families (SentencePiece BPE, byte-level BPE), NFD input.

Fixtures are real text sliced from ../shared/corpora; bases are Mistral v1's real tokenizer.model (from the installed
mistral_common package), a SentencePiece BPE and a byte-level BPE trained here on English."""

from __future__ import annotations

import json
import io
import shutil
import unicodedata

import pytest
import sentencepiece as spm

from cpt.stages import tokenizer as stage
from cpt.errors import ConfigError, DataError
from cpt.tok import sampling
from cpt.tok import spm_extend as se

from tok_fixtures import FIVE, byte_bpe, english_spm, make_clean, mistral_model, params, texts  # noqa: F401


@pytest.fixture(scope="session")
def mistral_run(tmp_path_factory, texts, mistral_model):
    layout = make_clean(tmp_path_factory.mktemp("run_mistral"), texts)
    metrics = stage.run(params(mistral_model), layout)
    return layout, metrics


# -- SentencePiece family: Mistral v1 --------------------------------------------------------------------------------


def test_old_ids_keep_id_text_score_and_type(mistral_run, mistral_model):
    layout, metrics = mistral_run
    base, merged = se.load_proto(mistral_model), se.load_proto(layout.tokenizer / "tokenizer.model")
    assert metrics["base_vocab"] == len(base.pieces) == 32000
    assert len(merged.pieces) == metrics["vocab"] == 32000 + metrics["added"]
    for a, b in zip(base.pieces, merged.pieces):
        assert (a.piece, a.score, a.type) == (b.piece, b.score, b.type)
    assert sum(p.type == se.BYTE for p in merged.pieces) == 256
    low = min(p.score for p in base.pieces if p.type == se.NORMAL)
    assert all(p.score < low for p in merged.pieces[32000:])


def test_new_tokens_json_maps_each_piece_to_base_ids(mistral_run, mistral_model):
    layout, metrics = mistral_run
    nt = json.loads((layout.tokenizer / "new_tokens.json").read_text())
    assert nt["base_vocab"] == 32000 and nt["vocab"] == 32000 + len(nt["added"]) == metrics["vocab"]
    assert [a["id"] for a in nt["added"]] == list(range(32000, nt["vocab"]))
    sp = spm.SentencePieceProcessor(model_file=str(mistral_model))
    merged = spm.SentencePieceProcessor(model_file=str(layout.tokenizer / "tokenizer.model"))
    for a in nt["added"][:200]:
        assert merged.id_to_piece(a["id"]) == a["piece"]
        assert a["text"] == a["piece"].replace("\u2581", " ")
        assert a["base_ids"] and 1 not in a["base_ids"]  # no BOS
        assert sp.decode(a["base_ids"]) == a["text"].lstrip(" ") or sp.id_to_piece(a["base_ids"])[0].startswith("\u2581")
        assert "".join(sp.id_to_piece(a["base_ids"])).replace("<0x", "") .startswith(a["piece"][:1]) or any(
            sp.is_byte(i) for i in a["base_ids"])
    # mid-sentence view: " xin" as the base sees it after other text, exactly
    word = next(a for a in nt["added"] if a["piece"].startswith("\u2581") and len(a["piece"]) > 2)
    assert sp.encode("a" + word["text"])[1:] == word["base_ids"]


def test_english_held_out_lines_unchanged_and_vietnamese_gains(mistral_run):
    _, m = mistral_run
    assert m["old_language_lines"] == 300
    assert m["old_language_changed_lines"] == 0
    assert m["old_language_docs"] == 300 and m["old_language_changed_docs"] == 0
    vi = m["languages"]["vi"]
    # guard: lexicon (the default): old-spelled pieces only where no English word form changes; bench/ has the rest
    assert vi["tokens_per_word_base"] > 2.5 and vi["tokens_per_word"] < 0.8 * vi["tokens_per_word_base"]
    for lang in ("zh", "ja", "ko"):
        assert m["languages"][lang]["chars_per_token"] > m["languages"][lang]["chars_per_token_base"]
    en = m["languages"]["en"]
    assert en["tokens_per_word"] == en["tokens_per_word_base"]
    assert m["roundtrip_failures"] == 0 and m["hf_mismatch_lines"] == 0


def test_autotokenizer_loads_and_encodes_like_the_merged_model(mistral_run, texts):
    from transformers import AutoTokenizer

    layout, _ = mistral_run
    hf = AutoTokenizer.from_pretrained(str(layout.tokenizer))
    sp = spm.SentencePieceProcessor(model_file=str(layout.tokenizer / "tokenizer.model"))
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<s>", "</s>", "<unk>")
    assert len(hf) == sp.get_piece_size()
    for lang in FIVE:
        for line in texts[f"eval_{lang}"][:100]:
            ids = hf.encode(line, add_special_tokens=False)
            assert ids == sp.encode(line), (lang, line)
            assert hf.encode(line)[0] == 1  # BOS like the base
            assert hf.decode(ids) == line  # round trip, NFC text
    tricky = ["  two leading spaces", "tabs\tand\nnewlines", "trailing  ", "emoji 😀 and ǅ", "người Việt  Nam"]
    for line in tricky:
        assert hf.encode(line, add_special_tokens=False) == sp.encode(line)
        assert hf.decode(hf.encode(line, add_special_tokens=False)) == line


def test_nfd_input_round_trips_and_matches(mistral_run, texts):
    from transformers import AutoTokenizer

    layout, _ = mistral_run
    hf = AutoTokenizer.from_pretrained(str(layout.tokenizer))
    sp = spm.SentencePieceProcessor(model_file=str(layout.tokenizer / "tokenizer.model"))
    for line in texts["eval_vi"][:50]:
        nfd = unicodedata.normalize("NFD", line)
        assert nfd != line or line.isascii()
        ids = hf.encode(nfd, add_special_tokens=False)
        assert ids == sp.encode(nfd)
        assert hf.decode(ids) == nfd  # lossless, never silently re-normalised
        # NFD text is the clean stage's job to fix: it costs tokens, which is why training text is NFC
        assert len(ids) >= len(sp.encode(line))


def test_score_zero_recipe_changes_english_ours_does_not(mistral_model, texts):
    """The field's copied recipe vs ours, same pieces: appended with score 0 they split English words differently."""
    base = se.load_proto(mistral_model)
    lines = [ln for d in texts["train_vi"] for ln in d.split("\n") if ln.strip()]
    new = se.train_new_model(lines, base, se.TrainConfig(vocab_size=1500))
    have = {q.piece for q in base.pieces}
    pieces = [p for p in se.ranked_pieces(new) if p not in have]
    naive = se._copy(base)
    for p in pieces:
        naive.pieces.add(piece=p, score=0.0, type=se.NORMAL)
    ours, _ = se.merge(base, pieces)
    english = texts["eval_en"]
    b, n, o = (se.processor(x).encode(english) for x in (base, naive, ours))
    naive_changed = sum(x != y for x, y in zip(b, n))
    ours_changed = sum(x != y for x, y in zip(b, o))
    assert naive_changed > 20
    assert ours_changed < naive_changed / 3


def test_exact_pruning_is_exact_on_the_chooser_text(mistral_model, texts):
    """A piece is pruned iff it would fire on the chooser text: after pruning, 0 chooser lines change; adding back
    any one pruned piece changes at least one."""
    base = se.load_proto(mistral_model)
    chooser = [ln for d in texts["train_en"] for ln in d.split("\n") if ln.strip()][:12000]
    conflicts = se.old_conflicts(base, chooser)
    vi = [ln for d in texts["train_vi"] for ln in d.split("\n") if ln.strip()][:6000]
    have = {q.piece for q in base.pieces}
    cand = [p for p in se.ranked_pieces(se.train_new_model(vi, base, se.TrainConfig(vocab_size=3000)))
            if p not in have]
    pruned = [p for p in cand if p in conflicts]
    kept = [p for p in cand if p not in conflicts]
    assert pruned and kept
    sb = se.processor(base)
    ref = sb.encode(chooser)
    merged, _ = se.merge(base, kept)
    assert se.processor(merged).encode(chooser) == ref
    for p in pruned[:5]:
        one, _ = se.merge(base, [p])
        assert se.processor(one).encode(chooser) != ref, p


def test_hf_export_fixes_transformers_whitespace_conversion(mistral_model, tmp_path):
    """transformers' own .model -> fast conversion orders merges by id; Mistral's ▁▁ pieces then fire first."""
    from transformers import AutoTokenizer

    from cpt.tok import hf_export

    base = se.load_proto(mistral_model)
    hf_export.write_folder(base, tmp_path, None)
    ours = AutoTokenizer.from_pretrained(str(tmp_path))
    sp = se.processor(base)
    line = "  hello   world"
    assert ours.encode(line, add_special_tokens=False) == sp.encode(line)
    conv = tmp_path / "conv"
    conv.mkdir()
    shutil.copy(mistral_model, conv / "tokenizer.model")
    (conv / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    assert AutoTokenizer.from_pretrained(str(conv)).encode(line, add_special_tokens=False) != sp.encode(line)


# -- SentencePiece family: a small English base with its own tokenizer_config ---------------------------------------


def test_small_english_spm_base_keeps_config_and_specials(tmp_path, texts, english_spm):
    from transformers import AutoTokenizer

    layout = make_clean(tmp_path, texts, langs=("vi",))
    m = stage.run(params(english_spm, languages=["vi"], max_train_chars=600_000, check_lines=100), layout)
    assert m["old_language_changed_lines"] == 0 and m["roundtrip_failures"] == 0 and m["hf_mismatch_lines"] == 0
    assert m["languages"]["vi"]["tokens_per_word"] < m["languages"]["vi"]["tokens_per_word_base"]
    cfg = json.loads((layout.tokenizer / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == "{{ messages }}"
    base = AutoTokenizer.from_pretrained(str(english_spm))
    ext = AutoTokenizer.from_pretrained(str(layout.tokenizer))
    assert base.special_tokens_map == ext.special_tokens_map
    assert ext.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert (layout.reports / "fertility.md").read_text().count("| vi |") == 1


# -- byte-level BPE family --------------------------------------------------------------------------------------------


def test_byte_level_bpe_base(tmp_path, texts, byte_bpe):
    """A GPT-2-style base that spells Hangul and most Vietnamese letters in raw bytes: the extension is exact on the
    chooser documents and lines, every new token decodes to whole characters (before, merges of two bytes of a
    Hangul syllable were added: pieces ending mid-syllable, U+FFFD on their own) and every line of the five
    languages round-trips, NFC and NFD (conjoining jamo) alike."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    layout = make_clean(tmp_path, texts, langs=("vi", "ko"))
    m = stage.run(params(byte_bpe, languages=["vi", "ko"], max_train_chars=150_000, check_lines=100,
                         old_max_chars=500_000, vocab_size={"vi": 1200, "ko": 500}), layout)
    assert m["base_kind"] == "bpe" and m["added"] > 100
    assert m["roundtrip_failures"] == 0 and m["hf_mismatch_lines"] == 0
    nt = json.loads((layout.tokenizer / "new_tokens.json").read_text())
    assert not [a["text"] for a in nt["added"] if "\ufffd" in a["text"]]
    # this base spells every Hangul syllable in three single bytes: the first merge would be half a character, so
    # Korean gains nothing here (a real multilingual base has the byte-pair tokens; bench/ measures Tekken)
    assert m["languages"]["ko"]["tokens_per_word"] == m["languages"]["ko"]["tokens_per_word_base"]
    # exact on the chooser, as whole documents (newlines, indentation) and as lines
    base_tok = Tokenizer.from_file(str(byte_bpe / "tokenizer.json"))
    ext_tok = Tokenizer.from_file(str(layout.tokenizer / "tokenizer.json"))
    held = sampling.heldout_ids(layout.clean, 7, stage.SHARDS_VAL_FRACTION, "old")
    docs = sampling.sample_docs(layout.clean, 7, 500_000, exclude=held, role="train", domain="old")
    for view in (docs, sampling.lines_of(docs)):
        assert [e.ids for e in base_tok.encode_batch(view)] == [e.ids for e in ext_tok.encode_batch(view)]
    # held out (guard: lexicon, the default): no English word form changes, and no held-out line or document does
    assert m["old_language_changed_lines"] == 0 and m["old_language_changed_docs"] == 0
    # only whole characters that English never meets (ư, ơ: two bytes; ạ, ệ are three and this base has no pair for
    # their first two): a small gain here; a real multilingual base (bench/: Tekken) gains far more
    assert m["languages"]["vi"]["tokens_per_word"] < m["languages"]["vi"]["tokens_per_word_base"]
    base = json.loads((byte_bpe / "tokenizer.json").read_text())
    ext = json.loads((layout.tokenizer / "tokenizer.json").read_text())
    for tok, i in base["model"]["vocab"].items():
        assert ext["model"]["vocab"][tok] == i
    # added tokens outside the model vocab keep their ids once loaded (tokenizers re-numbers them from the model's
    # size: before, they moved onto the last new tokens, which then decoded as "<|im_start|>")
    assert {t["content"]: t["id"] for t in base["added_tokens"]} == {
        t["content"]: ext_tok.token_to_id(t["content"]) for t in base["added_tokens"]}
    assert ext_tok.id_to_token(nt["vocab"] - 1) == nt["added"][-1]["piece"]
    assert ext["model"]["merges"][: len(base["model"]["merges"])] == base["model"]["merges"]
    assert [a["id"] for a in nt["added"]] == list(range(nt["base_vocab"], nt["vocab"]))
    for a in nt["added"][:100]:
        assert base_tok.decode(a["base_ids"]) == a["text"]
    hf = AutoTokenizer.from_pretrained(str(layout.tokenizer))
    assert hf.eos_token == "<|endoftext|>"
    for lang in FIVE:
        for line in texts[f"eval_{lang}"][:50]:
            for form in ("NFC", "NFD"):
                x = unicodedata.normalize(form, line)
                assert hf.decode(hf.encode(x, add_special_tokens=False)) == x


def test_exact_on_whole_chooser_documents_and_strict_names_the_pieces(tmp_path, texts, mistral_model):
    """With the guard off, exactness rests on the check alone: every chooser document, encoded whole through the
    exported tokenizer.json as the shards stage does (a word after a newline has no dummy-prefix ▁), and every chooser
    line encode exactly like the base (pruning per line only, before, left pieces that fire after a newline). Held-out
    news lines do change without the guard, and strict mode stops the stage naming the pieces (before, it only
    stopped on round-trip failures)."""
    from tokenizers import Tokenizer

    from cpt.tok import hf_export

    layout = make_clean(tmp_path, texts, langs=("vi",))
    with pytest.raises(DataError, match=r"held-out old-language lines and \d+ of \d+ documents encode differently "
                                        r"from the base, through new pieces \S+"):
        stage.run(params(mistral_model, languages=["vi"], vocab_size={"vi": 1500}, max_train_chars=300_000,
                         old_max_chars=600_000, check_lines=50, guard="exact"), layout)
    base = hf_export.build_tokenizer(se.load_proto(mistral_model), add_bos=False)
    ext = Tokenizer.from_file(str(layout.tokenizer / "tokenizer.json"))  # written before the checks
    base.encode_special_tokens = ext.encode_special_tokens = True
    held = sampling.heldout_ids(layout.clean, 7, stage.SHARDS_VAL_FRACTION, "old")
    docs = sampling.sample_docs(layout.clean, 7, 600_000, exclude=held, role="train", domain="old")
    assert any("\n" in d for d in docs)
    enc = lambda tok, xs: [e.ids for e in tok.encode_batch(xs, add_special_tokens=False)]  # noqa: E731
    assert enc(base, docs) == enc(ext, docs)
    sp_base = se.processor(se.load_proto(mistral_model))
    sp_ext = se.processor(se.load_proto(layout.tokenizer / "tokenizer.model"))
    lines = sampling.lines_of(docs)
    assert sp_base.encode(lines) == sp_ext.encode(lines)


def test_hf_export_user_defined_pieces_match_sentencepiece(tmp_path, texts):
    """USER_DEFINED pieces (<br>): SentencePiece puts the dummy prefix once, before the whole text, and matches the
    piece inside it; the export gave every segment after one its own prefix ("hello<br>world" -> ▁world, not w|orld).
    One known exception: a text that is exactly one user-defined piece (HF drops the prefix token there)."""
    from tokenizers import Tokenizer

    from cpt.tok import hf_export

    lines = [ln for d in texts["train_en"] for ln in d.split("\n") if ln.strip()][:4000]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=600, byte_fallback=True,
        user_defined_symbols=["<br>", "[SEP]"], normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2, num_threads=1)
    proto = se.pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    hf_export.write_folder(proto, tmp_path, None)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.encode_special_tokens = True
    sp = se.processor(proto)
    assert sp.encode("hello<br>world", out_type=str)[-3:] != ["<br>", "\u2581world"]
    cases = ["hello<br>world", "<br>x", "a<br> b", " <br>", "x<br>[SEP]y", "two\nlines<br>\tand  tabs", "  lead",
             "\n".join(lines[:30])] + lines[:200]
    for text in cases:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert tok.decode(sp.encode(text), skip_special_tokens=False) == text


# -- params and inputs ------------------------------------------------------------------------------------------------


def test_errors_name_the_problem(tmp_path, texts, mistral_model):
    layout = make_clean(tmp_path, texts, langs=("vi",))
    with pytest.raises(ConfigError, match="unknown param"):
        stage.run(params(mistral_model, vocab=5), layout)
    with pytest.raises(DataError, match="not found"):
        stage.run(params(tmp_path / "nope"), layout)
    with pytest.raises(DataError, match=r"tokenizer.languages \['th'\]"):
        stage.run(params(mistral_model, languages=["th"]), layout)
    with pytest.raises(DataError, match="cpt base"):
        stage.run({"tokenizer": {}}, layout)


def test_eval_text_never_reaches_training(tmp_path, texts, mistral_model):
    """A word that exists only in role: eval text can never become a piece."""
    t = dict(texts)
    marker = "Zqxjvbwkđ"
    t["eval_vi"] = [f"{marker} {marker} {marker}"] * 300
    layout = make_clean(tmp_path, t, langs=("vi",))
    stage.run(params(mistral_model, languages=["vi"], vocab_size=1000, max_train_chars=400_000, check_lines=50), layout)
    nt = json.loads((layout.tokenizer / "new_tokens.json").read_text())
    assert not any("qxj" in a["piece"] for a in nt["added"])


def test_deterministic_for_a_seed(tmp_path, texts, mistral_model):
    outs = []
    for run in ("a", "b"):
        layout = make_clean(tmp_path / run, texts, langs=("vi",))
        stage.run(params(mistral_model, languages=["vi"], vocab_size=800, max_train_chars=300_000, check_lines=20),
                  layout)
        outs.append([(layout.tokenizer / f).read_bytes() for f in ("tokenizer.model", "tokenizer.json",
                                                                    "new_tokens.json")])
    assert outs[0] == outs[1]


def test_fixed_point_prunes_what_fires_until_nothing_does():
    """cpt.tok.exact on a toy encoder: a piece that only fires once a higher-priority one is pruned ("b" in "ab")
    is caught in the next round; texts that did not change are not re-encoded."""
    from cpt.tok import exact

    seen: list[str] = []

    def build(kept):
        def enc(xs):
            seen.extend(xs)
            return [[100] if "a" in kept and "a" in x else [101] if "b" in kept and "b" in x else [0] for x in xs]

        return exact.Built({"t": enc}, {100: "a", 101: "b"}.__getitem__)

    views = [exact.View("t", ["ab", "zz"], lambda xs: [[0] for _ in xs])]
    kept, _, summary = exact.fixed_point(["a", "b", "c"], build, views, lambda k, f: [p for p in k if p not in f])
    assert kept == ["c"] and summary["rounds"] == 3 and summary["pruned"] == 2
    assert seen.count("zz") == 1


def test_dotted_capital_i_neither_crashes_nor_passes_as_english():
    """"İ".lower() is two code points (i + U+0307): the guard used to raise a TypeError on "İstanbul" in English
    text or on any Turkish new-language text (issue 24, point 8)."""
    from cpt.tok.guard import Guard, in_letters_of

    old = ["The ship sailed from Istanbul to Venice.", "He wrote it in a letter."]
    english = in_letters_of(old)
    # U+0130 is Latin Extended-A: a block this English text never writes, so the line counts as quoting another
    # language (as "Đà Nẵng" does) ...
    assert english("Istanbul") and not english("İstanbul") and not english("Đà Nẵng")
    # ... and as English once the old text writes that block (a Polish name)
    assert in_letters_of(old + ["Łódź is in Poland."])("İstanbul")
    guard = Guard(old, {"tr": ["İstanbul büyük bir şehirdir.", "İzmir ve İstanbul güzeldir."] * 50})
    # a Turkish letter, in a block this English never writes: pieces carrying it cannot fire on this English
    assert "İ" in guard.native_letters and "İ" not in guard.possible
