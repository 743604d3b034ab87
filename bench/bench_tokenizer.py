"""Benchmark: extending Mistral-7B v1's tokenizer for Vietnamese (full viwiki), Chinese, Japanese and Korean.

    .venv/bin/python bench/bench_tokenizer.py [--vi-vocab 12000] [--max-train-chars 0] [--out bench/results/tokenizer.json]

Runs the real stage (``cpt.stages.tokenizer.run``) on a data/clean built from ../shared/corpora (train: viwiki, cmrc2018,
jsquad + 吾輩は猫である, UD Korean-Kaist + KLUE premises; old-language chooser: the Gutenberg books), then compares, on
the SAME candidate pieces, the recipes in the field notes:

- ``score0``: pieces appended with score 0 (Chinese-LLaMA-Alpaca's merge script);
- ``below_min``: scored below the base minimum, nothing pruned;
- ``exact``: + pruning of the pieces that fire on the old-language training text;
- ``cpt``: + the held-out guard (``cpt.tok.guard``) -- what the stage ships.

English is measured on three held-out sets never used for training or pruning: NTREX-128 English news (1,997 lines),
WikiText-2 test (the lines of the 62 articles) and XQuAD English contexts (240 Wikipedia paragraphs). The guard's
threshold was compared on the first two; XQuAD is the untouched check. Fertility is measured on NTREX-128 (the same
1,997 sentences in every language). Speed: HF ``tokenizer.json`` encode throughput of the extended tokenizer vs the
base's on the same English text in the same run (ratio; the extension must not slow the old language down).
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cpt.stages import tokenizer as stage  # noqa: E402
from cpt.tok import sampling  # noqa: E402
from cpt.io import write_json, write_jsonl  # noqa: E402
from cpt.layout import Layout  # noqa: E402
from cpt.data.records import SourceInfo, write_manifest  # noqa: E402
from cpt.tok import fertility as fert  # noqa: E402
from cpt.tok import spm_extend as se  # noqa: E402
from cpt.tok.guard import Guard  # noqa: E402


def jsonl_texts(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def build_clean(root: Path, corpora: Path) -> Layout:
    layout = Layout(root)
    sources = []

    def add(name, lang, domain, role, docs):
        rows = [{"id": f"{name}/{i}", "source": name, "lang": lang, "domain": domain, "role": role,
                 "text": unicodedata.normalize("NFC", t)} for i, t in enumerate(docs) if t.strip()]
        write_jsonl(layout.clean / f"{name}.jsonl", rows)
        sources.append(SourceInfo(name, lang, domain, role, f"{name}.jsonl", len(rows)))

    add("viwiki", "vi", "new", "train", jsonl_texts(corpora / "viwiki/viwiki.jsonl.gz"))
    add("zh_cmrc", "zh", "new", "train", jsonl_texts(corpora / "zh_cmrc2018_contexts/cmrc2018_contexts.jsonl"))
    add("ja_jsquad", "ja", "new", "train", jsonl_texts(corpora / "ja_jsquad_contexts/jsquad_v1.3_contexts.jsonl"))
    add("ja_neko", "ja", "new", "train",
        (corpora / "ja_wagahaiwa_nekodearu/wagahaiwa_nekodearu_clean.txt").read_text(encoding="utf-8").split("\n"))
    add("ko_kaist", "ko", "new", "train", jsonl_texts(corpora / "ko_ud_kaist/ko_kaist_dev_test_docs.jsonl"))
    add("ko_klue", "ko", "new", "train", jsonl_texts(corpora / "ko_klue_nli_premises/klue_nli_v1.1_dev_premises.jsonl"))
    add("en_gutenberg", "en", "old", "train", jsonl_texts(corpora / "en_gutenberg/en_gutenberg_books.jsonl.gz"))
    nt = corpora / "ntrex128"
    for lang, f in [("en", "src.eng"), ("vi", "ref.vie"), ("zh", "ref.zho-CN"), ("ja", "ref.jpn"), ("ko", "ref.kor")]:
        lines = (nt / f"newstest2019-{f}.txt").read_text(encoding="utf-8").split("\n")
        add(f"ntrex_{lang}", lang, "old" if lang == "en" else "new", "eval", lines)
    write_manifest(layout.clean, sources)
    return layout


def english_sets(corpora: Path) -> dict[str, list[str]]:
    nfc = lambda s: unicodedata.normalize("NFC", s)  # noqa: E731
    ntrex = [nfc(x) for x in (corpora / "ntrex128/newstest2019-src.eng.txt").read_text(encoding="utf-8").split("\n")
             if x.strip()]
    wiki = [nfc(x) for x in (corpora / "en_wikitext2/test.txt").read_text(encoding="utf-8").split("\n") if x.strip()]
    xq = json.loads((corpora / "xquad/xquad.en.json").read_text(encoding="utf-8"))
    xquad = [nfc(p["context"]) for art in xq["data"] for p in art["paragraphs"]]
    return {"ntrex_en": ntrex, "wikitext2_test": wiki, "xquad_en": xquad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", default=str(REPO.parent / "shared" / "corpora"))
    ap.add_argument("--vi-vocab", type=int, default=12000, help="size of the Vietnamese SentencePiece model")
    ap.add_argument("--cjk-vocab", type=int, default=8000)
    ap.add_argument("--max-train-chars", type=int, default=0, help="0 = every training character (full viwiki)")
    ap.add_argument("--out", default=str(REPO / "bench/results/tokenizer.json"))
    args = ap.parse_args()
    corpora = Path(args.corpora)

    import mistral_common

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_dir = tmp / "mistral_v1"
        base_dir.mkdir()
        (base_dir / "tokenizer.model").write_bytes(
            (Path(mistral_common.__file__).parent / "data/tokenizer.model.v1").read_bytes())
        layout = build_clean(tmp / "proj", corpora)
        params = {"seed": 1234, "tokenizer": {
            "base": str(base_dir / "tokenizer.model"),
            "vocab_size": {"vi": args.vi_vocab, "zh": args.cjk_vocab, "ja": args.cjk_vocab, "ko": args.cjk_vocab},
            "max_train_chars": args.max_train_chars, "old_max_chars": 0, "check_lines": 0}}
        t = time.perf_counter()
        metrics = stage.run(params, layout)
        stage_seconds = time.perf_counter() - t
        print(f"stage: {stage_seconds:.1f}s, added {metrics['added']}", flush=True)

        # -- the recipes compared on the same Vietnamese candidates -------------------------------------------
        cfg = stage.config(params)
        base = se.load_proto(base_dir / "tokenizer.model")
        vi_lines = sampling.sample_lines(layout.clean, 1234, 0, role="train", domain="new", lang="vi")
        old_lines = sampling.sample_lines(layout.clean, 1234, 0, role="train", domain="old")
        t = time.perf_counter()
        vi_model = se.train_new_model(vi_lines, base, se.TrainConfig(vocab_size=args.vi_vocab, seed=1234))
        vi_train_seconds = time.perf_counter() - t
        have = {p.piece for p in base.pieces}
        normal = {p.piece for p in base.pieces if p.type == se.NORMAL}
        cand = [p for p in se.ranked_pieces(vi_model) if p not in have]
        conflicts = se.old_conflicts(base, old_lines)
        guard = Guard(old_lines, {"vi": vi_lines}, min_freq=cfg["old_alphabet_min_freq"], foreign_ratio=cfg["foreign_ratio"])
        exact = se.reachable([p for p in cand if p not in conflicts], normal)
        shipped = se.reachable([p for p in cand if p not in conflicts and guard.allows(p)], normal)
        naive = se._copy(base)
        for p in cand:
            naive.pieces.add(piece=p, score=0.0, type=se.NORMAL)
        recipes = {"score0": naive, "below_min": se.merge(base, cand)[0], "exact": se.merge(base, exact)[0],
                   "cpt": se.merge(base, shipped)[0]}
        english = english_sets(corpora)
        vi_eval = [x for x in (corpora / "ntrex128/newstest2019-ref.vie.txt").read_text(encoding="utf-8").split("\n")
                   if x.strip()]
        sp_base = se.processor(base)
        enc = lambda sp: (lambda lines: sp.encode(lines, num_threads=2))  # noqa: E731
        base_vi = fert.fertility(vi_eval, "vi", enc(sp_base))
        rows = {"mistral_v1": {"added": 0, "vi_tokens_per_word": round(base_vi.tokens_per_word, 4)}}
        for name, proto in recipes.items():
            sp = se.processor(proto)
            row = {"added": len(proto.pieces) - len(base.pieces),
                   "vi_tokens_per_word": round(fert.fertility(vi_eval, "vi", enc(sp)).tokens_per_word, 4)}
            for set_name, lines in english.items():
                row[f"{set_name}_changed"] = len(fert.changed_lines(lines, enc(sp_base), enc(sp)))
            rows[name] = row
            print(name, row, flush=True)

        # -- speed: HF tokenizer.json encode, extended vs base, same English text ------------------------------
        from tokenizers import Tokenizer

        from cpt.tok import hf_export

        base_hf = hf_export.build_tokenizer(base)
        ext_hf = Tokenizer.from_file(str(layout.tokenizer / "tokenizer.json"))
        text = english["wikitext2_test"] + english["ntrex_en"]
        speed = {}
        for name, tk in (("base", base_hf), ("extended", ext_hf)):
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                tk.encode_batch(text, add_special_tokens=False)
                best = min(best, time.perf_counter() - t)
            speed[name] = sum(map(len, text)) / best
        report = {
            "what": "Mistral-7B v1 tokenizer extended for vi (full viwiki), zh, ja, ko by cpt's tokenizer stage",
            "machine": {"cpu_count": __import__("os").cpu_count(), "python": platform.python_version()},
            "params": params["tokenizer"],
            "stage_seconds": round(stage_seconds, 1),
            "stage_metrics": metrics,
            "english_lines": {k: len(v) for k, v in english.items()},
            "vi_recipes": {"vi_vocab": args.vi_vocab, "vi_train_seconds": round(vi_train_seconds, 1),
                           "candidates": len(cand), "rows": rows},
            "hf_encode_chars_per_s": {k: round(v) for k, v in speed.items()},
            "hf_encode_speed_ratio_extended_vs_base": round(speed["extended"] / speed["base"], 3),
        }
        ext_sp = se.processor(se.load_proto(layout.tokenizer / "tokenizer.model"))
        report["english_changed_by_stage_output"] = {
            k: len(fert.changed_lines(v, enc(sp_base), enc(ext_sp))) for k, v in english.items()}
        write_json(args.out, report)
        print(json.dumps({k: report[k] for k in ("vi_recipes", "english_changed_by_stage_output",
                                                  "hf_encode_speed_ratio_extended_vs_base")}, indent=1))
        print(fert.table(metrics["languages"]))


if __name__ == "__main__":
    main()
