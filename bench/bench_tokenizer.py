"""Benchmark: cpt's tokenizer extension on real bases of both families, old-language exactness on held-out text.

    .venv/bin/python bench/bench_tokenizer.py --base mistral   # Mistral-7B v1 tokenizer.model (SentencePiece BPE)
    .venv/bin/python bench/bench_tokenizer.py --base tekken    # Mistral Tekken (tiktoken -> tokenizer.json, byte-level)
    .venv/bin/python bench/bench_tokenizer.py --base gpt2      # GPT-2-style byte-level BPE trained here on the books
    .venv/bin/python bench/bench_tokenizer.py --base tiny      # the demo's 4k SentencePiece base (cpt.training.tiny)
    .venv/bin/python bench/bench_tokenizer.py --base smollm2   # SmolLM2's 49k byte-level BPE (/work/cache/smollm2-hf)
    .venv/bin/python bench/bench_tokenizer.py --table          # bench/results/tokenizer_lexicon.json: the trade table

Runs the real stage (``cpt.stages.tokenizer.run``, strict off so every number is reported) on a data/clean built
from ../shared/corpora. New pieces train on viwiki, cmrc2018, jsquad + 吾輩は猫である, UD Korean-Kaist + KLUE
premises. The old-language chooser is the English Gutenberg books MINUS a held-out fifth of them (by hash of the
title) plus the WikiText-2 *valid* articles. Held out from every choice, and measured:

- whole documents, encoded as the shards stage encodes them (the ``tokenizer.json``, newlines, tabs and leading
  spaces included): the held-out Gutenberg books and the 62 WikiText-2 *test* articles;
- lines (NFC, one per encode call): those documents' lines, NTREX-128 English (1,997 news sentences), XQuAD
  English (240 Wikipedia paragraphs; it quotes Vietnamese names such as Trần Hưng Đạo, i.e. new-language text) and
  ``tests/fixtures/english_unlike_books.txt`` (written for this check: names and places from many languages quoted in
  English, ASCII-spelled Vietnamese names, code, URLs, numbers and dates).

Fertility and the round trip (``decode(encode(x)) == x`` through the extended ``tokenizer.json``) are on NTREX-128,
the same 1,997 sentences in all five languages. Writes ``bench/results/tokenizer_<base>.json``.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import platform
import re
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cpt.data.records import SourceInfo, write_manifest  # noqa: E402
from cpt.io import write_json, write_jsonl  # noqa: E402
from cpt.layout import Layout  # noqa: E402
from cpt.stages import tokenizer as stage  # noqa: E402
from cpt.tok import fertility as fert  # noqa: E402
from cpt.tok.guard import in_letters_of  # noqa: E402
from cpt.tok.sampling import lines_of  # noqa: E402

FIVE = ("en", "vi", "zh", "ja", "ko")
FIXTURE = REPO / "tests/fixtures/english_unlike_books.txt"
SMOLLM2 = Path("/work/cache/smollm2-hf")
NTREX = {"en": "src.eng", "vi": "ref.vie", "zh": "ref.zho-CN", "ja": "ref.jpn", "ko": "ref.kor"}


def nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def jsonl_texts(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def wikitext_articles(path: Path) -> list[str]:
    """WikiText-2 split into its articles (a top-level ' = Title = ' line starts one), text kept as it is."""
    arts: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if re.match(r"^ = [^=].* = $", line) or not arts:
            arts.append([])
        arts[-1].append(line)
    return [nfc("\n".join(a)) for a in arts if "".join(a).strip()]


def held_out_book(title: str) -> bool:
    return hashlib.blake2b(title.encode(), digest_size=4).digest()[0] % 5 == 0


def english(corpora: Path) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """(chooser documents, held-out documents by set, held-out lines by set)."""
    books = jsonl_texts(corpora / "en_gutenberg/en_gutenberg_books.jsonl.gz")
    chooser = [nfc(b["text"]) for b in books if not held_out_book(b["title"])]
    chooser += wikitext_articles(corpora / "en_wikitext2/valid.txt")
    docs = {"gutenberg_heldout": [nfc(b["text"]) for b in books if held_out_book(b["title"])],
            "wikitext2_test": wikitext_articles(corpora / "en_wikitext2/test.txt")}
    xq = json.loads((corpora / "xquad/xquad.en.json").read_text(encoding="utf-8"))
    lines = {k: lines_of(v) for k, v in docs.items()}
    lines["ntrex_en"] = ntrex(corpora, "en")
    lines["xquad_en"] = [nfc(p["context"]) for art in xq["data"] for p in art["paragraphs"]]
    lines["unlike_books"] = [nfc(x) for x in FIXTURE.read_text(encoding="utf-8").split("\n") if x.strip()]
    return chooser, docs, lines


def ntrex(corpora: Path, lang: str) -> list[str]:
    text = (corpora / f"ntrex128/newstest2019-{NTREX[lang]}.txt").read_text(encoding="utf-8")
    return [nfc(x) for x in text.split("\n") if x.strip()]


def build_clean(root: Path, corpora: Path, chooser: list[str]) -> Layout:
    layout = Layout(root)
    sources = []

    def add(name, lang, domain, role, docs):
        rows = [{"id": f"{name}/{i}", "source": name, "lang": lang, "domain": domain, "role": role, "text": nfc(t)}
                for i, t in enumerate(docs) if t.strip()]
        write_jsonl(layout.clean / f"{name}.jsonl", rows)
        sources.append(SourceInfo(name, lang, domain, role, f"{name}.jsonl", len(rows)))

    texts = lambda p: [d["text"] for d in jsonl_texts(corpora / p)]  # noqa: E731
    add("viwiki", "vi", "new", "train", texts("viwiki/viwiki.jsonl.gz"))
    add("zh_cmrc", "zh", "new", "train", texts("zh_cmrc2018_contexts/cmrc2018_contexts.jsonl"))
    add("ja_jsquad", "ja", "new", "train", texts("ja_jsquad_contexts/jsquad_v1.3_contexts.jsonl"))
    add("ja_neko", "ja", "new", "train",
        (corpora / "ja_wagahaiwa_nekodearu/wagahaiwa_nekodearu_clean.txt").read_text(encoding="utf-8").split("\n"))
    add("ko_kaist", "ko", "new", "train", texts("ko_ud_kaist/ko_kaist_dev_test_docs.jsonl"))
    add("ko_klue", "ko", "new", "train", texts("ko_klue_nli_premises/klue_nli_v1.1_dev_premises.jsonl"))
    add("en_chooser", "en", "old", "train", chooser)
    for lang in FIVE:
        add(f"ntrex_{lang}", lang, "old" if lang == "en" else "new", "eval", ntrex(corpora, lang))
    write_manifest(layout.clean, sources)
    return layout


# -- the bases ------------------------------------------------------------------------------------------------------


def make_base(kind: str, folder: Path, chooser: list[str]) -> Path:
    """A base tokenizer folder: Mistral v1's .model, Tekken converted by transformers' TikTokenConverter, a GPT-2-style
    byte-level BPE or the demo's 4k SentencePiece BPE (both trained on the chooser books only)."""
    folder.mkdir(parents=True)
    import mistral_common

    data = Path(mistral_common.__file__).parent / "data"
    if kind == "mistral":
        (folder / "tokenizer.model").write_bytes((data / "tokenizer.model.v1").read_bytes())
    elif kind == "tekken":
        from transformers.convert_slow_tokenizer import TikTokenConverter

        d = json.loads((data / "tekken_240911.json").read_text())
        n = d["config"]["default_vocab_size"] - d["config"]["default_num_special_tokens"]
        ranks = {base64.b64decode(v["token_bytes"]): v["rank"] for v in d["vocab"][:n]}
        TikTokenConverter.load_tiktoken_bpe = staticmethod(lambda _url: ranks)  # the ranks, without a file
        tok = TikTokenConverter(vocab_file="tekken", pattern=d["config"]["pattern"],
                                extra_special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]).converted()
        tok.save(str(folder / "tokenizer.json"))
        write_json(folder / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    elif kind == "gpt2":
        from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
        from tokenizers.models import BPE

        tok = Tokenizer(BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(lines_of(chooser), trainer=trainer)
        tok.save(str(folder / "tokenizer.json"))
        write_json(folder / "tokenizer_config.json", {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    elif kind == "smollm2":  # the real base of the real-base issue: its tokenizer files only
        import shutil

        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (SMOLLM2 / name).exists():
                shutil.copy(SMOLLM2 / name, folder / name)
    elif kind == "tiny":
        from cpt.training.tiny import DEFAULTS, train_tokenizer

        train_tokenizer(lines_of(chooser), folder / "tokenizer.model", vocab_size=DEFAULTS["vocab_size"], seed=1234,
                        character_coverage=DEFAULTS["character_coverage"],
                        max_sentences=DEFAULTS["tokenizer_sentences"])
    else:
        raise SystemExit(f"unknown base {kind}")
    return folder


def hf(path: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok


def ids(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="mistral", choices=BASES)
    ap.add_argument("--lexicon-size", type=int, default=None, help="tokenizer.lexicon_size (default: the stage's)")
    ap.add_argument("--table", action="store_true", help="only collect the per-base results into the trade table")
    ap.add_argument("--corpora", default=str(REPO.parent / "shared" / "corpora"))
    ap.add_argument("--max-train-chars", type=int, default=5_000_000, help="per new language; 0 = all")
    ap.add_argument("--old-max-chars", type=int, default=5_000_000, help="chooser sample; 0 = all")
    ap.add_argument("--guard", default="lexicon", choices=stage.GUARDS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.table:
        return trade_table()
    corpora = Path(args.corpora)
    out_path = Path(args.out or REPO / f"bench/results/tokenizer_{args.base}_{args.guard}.json")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chooser, held_docs, held_lines = english(corpora)
        base_dir = make_base(args.base, tmp / "base", chooser)
        layout = build_clean(tmp / "proj", corpora, chooser)
        params = {"seed": 1234, "tokenizer": {
            "base": str(base_dir), "max_train_chars": args.max_train_chars, "old_max_chars": args.old_max_chars,
            "check_lines": 0, "strict": False, "guard": args.guard}}
        if args.lexicon_size is not None:
            params["tokenizer"]["lexicon_size"] = args.lexicon_size
        t = time.perf_counter()
        metrics = stage.run(params, layout)
        stage_seconds = time.perf_counter() - t
        print(f"stage: {stage_seconds:.1f}s, added {metrics['added']}", flush=True)

        ext_tok = hf(layout.tokenizer / "tokenizer.json")
        if (base_dir / "tokenizer.json").exists() and args.base != "tiny":
            base_tok = hf(base_dir / "tokenizer.json")
        else:  # a SentencePiece base: its tokenizer.json as the stage exports it (checked against the .model)
            from cpt.tok import hf_export
            from cpt.tok import spm_extend as se

            base_tok = hf_export.build_tokenizer(se.load_proto(base_dir / "tokenizer.model"), add_bos=False)
            base_tok.encode_special_tokens = True
        inv = {i: t for t, i in ext_tok.get_vocab(with_added_tokens=True).items()}
        in_old = in_letters_of(lines_of(chooser))
        english_rows = {}
        for name, texts in [*(("docs:" + k, v) for k, v in held_docs.items()),
                            *(("lines:" + k, v) for k, v in held_lines.items())]:
            a, b = ids(base_tok, texts), ids(ext_tok, texts)
            changed = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
            quoting = [i for i in range(len(texts)) if not in_old(texts[i])]  # e.g. naming Trần Hưng Đạo
            pure = [i for i in changed if in_old(texts[i])]
            fired = sorted({inv[t] for i in pure for t in set(b[i]) - set(a[i])})
            english_rows[name] = {"n": len(texts) - len(quoting), "changed": len(pure), "pieces": fired[:10],
                                  "examples": [texts[i][:160] for i in pure[:3]],
                                  "quoting_new_language": len(quoting),
                                  "quoting_changed": len(changed) - len(pure)}
            print(name, english_rows[name], flush=True)
        langs = {}
        for lang in FIVE:
            lines = ntrex(corpora, lang)
            b = fert.fertility(lines, lang, lambda x: ids(base_tok, x))
            n = fert.fertility(lines, lang, lambda x: ids(ext_tok, x))
            rt = fert.roundtrip_failures(lines, lambda x: ids(ext_tok, x), lambda i: ext_tok.decode(i, False))
            nfd = [unicodedata.normalize("NFD", x) for x in lines]
            rt_nfd = fert.roundtrip_failures(nfd, lambda x: ids(ext_tok, x), lambda i: ext_tok.decode(i, False))
            langs[lang] = {"tokens_per_unit_base": round(b.tokens_per_word, 4),
                           "tokens_per_unit": round(n.tokens_per_word, 4),
                           "unit": "char" if lang in fert.CHAR_LANGS else "word",
                           "roundtrip_failures": len(rt), "roundtrip_failures_nfd": len(rt_nfd)}
        printed = {k: v.pop("examples") for k, v in english_rows.items()}  # corpus text: printed, never written
        print(json.dumps(printed, ensure_ascii=False)[:2000], flush=True)
        partial = sum("\ufffd" in a["text"] for a in
                      json.loads((layout.tokenizer / "new_tokens.json").read_text())["added"])
        report = {
            "what": f"cpt tokenizer stage on the {args.base} base: vi, zh, ja, ko added; English held out",
            "machine": {"cpu_count": __import__("os").cpu_count(), "python": platform.python_version()},
            "params": {k: v for k, v in params["tokenizer"].items() if k != "base"},
            "stage_seconds": round(stage_seconds, 1),
            "stage_metrics": metrics,
            "english_heldout": english_rows,
            "languages": langs,
            "added_pieces_ending_inside_a_character": partial,
        }
        write_json(out_path, report)
        print(json.dumps({"added": metrics["added"], "languages": langs,
                          "english": {k: (v["changed"], v["n"], v["quoting_changed"], v["quoting_new_language"])
                                      for k, v in english_rows.items()},
                          "partial": partial}, indent=1))


BASES = ("mistral", "tekken", "gpt2", "tiny", "smollm2")


def trade_table() -> None:
    """bench/results/tokenizer_lexicon.json: one row per (base, guard) result file present, the columns a user
    chooses by: pieces added, tokens per word/char per new language (base and extended), changed held-out English
    lines and documents (text quoting a new language apart), round-trip failures NFC and NFD."""
    rows = []
    for base in BASES:
        for guard in stage.GUARDS:
            path = REPO / f"bench/results/tokenizer_{base}_{guard}.json"
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            eng = r["english_heldout"]
            rows.append({
                "base": base, "guard": guard, "added": r["stage_metrics"]["added"],
                "lexicon_size": r["params"].get("lexicon_size"),
                "stage_seconds": r["stage_seconds"],
                "tokens_per_unit": {k: [v["tokens_per_unit_base"], v["tokens_per_unit"]] for k, v in r["languages"].items()},
                "vi_ratio_to_base": round(r["languages"]["vi"]["tokens_per_unit"]
                                          / r["languages"]["vi"]["tokens_per_unit_base"], 4),
                "english_changed": {k: [v["changed"], v["n"]] for k, v in eng.items()},
                "english_changed_total": sum(v["changed"] for v in eng.values()),
                "english_quoting_new_language_changed": sum(v.get("quoting_changed", 0) for v in eng.values()),
                "roundtrip_failures": sum(v["roundtrip_failures"] for v in r["languages"].values()),
                "roundtrip_failures_nfd": sum(v["roundtrip_failures_nfd"] for v in r["languages"].values()),
                "held_out_fixture": "unlike_books" in {k.split(":")[-1] for k in eng},
            })
    out = REPO / "bench/results/tokenizer_lexicon.json"
    write_json(out, {"what": "guard mode x pieces added x new-language tokens per word (zh/ja: per char) x changed "
                             "held-out English x round-trip failures, per base (bench/bench_tokenizer.py --table)",
                     "rows": rows})
    for r in rows:
        print(r["base"], r["guard"], r["added"], r["tokens_per_unit"]["vi"], r["vi_ratio_to_base"],
              r["english_changed_total"], r["roundtrip_failures"], r["roundtrip_failures_nfd"])


if __name__ == "__main__":
    main()
