"""The SentencePiece-base path of the stage: train -> choose -> merge -> export -> the encoders the checks use."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cpt.io import write_json
from cpt.layout import Layout
from cpt.tok import exact, hf_export
from cpt.tok import spm_extend as se
from cpt.tok.guard import Guard, in_letters_of

log = logging.getLogger(__name__)


@dataclass
class Extension:
    """What both families hand back to the stage: the added pieces and encoders for base, merged and HF output."""

    kind: str
    base_file: Path
    base_vocab: int
    added: list[str]
    candidates: int
    pruned_exact: int
    pruned_guard: int
    pruned_unreachable: int
    encode_base: Callable[[list[str]], list[list[int]]]
    encode: Callable[[list[str]], list[list[int]]]
    encode_hf: Callable[[list[str]], list[list[int]]]
    decode_hf: Callable[[list[int]], str]
    decode_base: Callable[[list[int]], str]
    # whole documents through the base's and the extension's tokenizer.json, as the shards stage encodes them
    encode_docs_base: Callable[[list[str]], list[list[int]]]
    encode_docs: Callable[[list[str]], list[list[int]]]
    token: Callable[[int], str]  # an extension id's token text (names the pieces behind an old-language change)
    pruned_verified: int = 0  # pruned by the fixed point (cpt.tok.exact) after the analytic pruning and the guard
    exact_rounds: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def choose(
    ranked: list[str],
    base_pieces: set[str],
    base_normal: set[str],
    conflicts: set[str],
    guard: Guard | None,
    max_added: int,
) -> tuple[list[str], dict[str, int]]:
    """Candidates (best first) minus base pieces, minus exact old-language conflicts, minus what the guard refuses,
    minus what is then unreachable; capped at ``max_added`` (the cap re-checks reachability)."""
    cand = [p for p in ranked if p not in base_pieces]
    exact = [p for p in cand if p not in conflicts]
    guarded = [p for p in exact if guard is None or guard.allows(p)]
    kept = se.reachable(guarded, base_normal)
    if max_added and len(kept) > max_added:
        kept = se.reachable(kept[:max_added], base_normal)
    counts = {
        "candidates": len(cand),
        "pruned_exact": len(cand) - len(exact),
        "pruned_guard": len(exact) - len(guarded),
        "pruned_unreachable": len(guarded) - len(kept),
    }
    return kept, counts


def new_tokens(base: se.pb.ModelProto, merged: se.pb.ModelProto, added: list[str]) -> dict[str, Any]:
    """new_tokens.json: each added piece with the BASE ids of its text as the base sees it mid-sentence (no dummy
    prefix, no BOS; the ▁ marker is encoded as the space it stands for)."""
    mid = se.processor(base, add_dummy_prefix=False)
    n = len(base.pieces)
    ids = mid.encode(added)
    return {
        "base_vocab": n,
        "vocab": len(merged.pieces),
        "added": [
            {"id": n + i, "piece": p, "text": p.replace(se.SPACE, " "), "base_ids": list(b)}
            for i, (p, b) in enumerate(zip(added, ids))
        ],
    }


def hf_encoder(tok) -> Callable[[list[str]], list[list[int]]]:
    """Batch ids from a ``tokenizers.Tokenizer`` as the shards stage calls it (no added specials, special-token
    strings in the text encoded as text)."""
    tok.encode_special_tokens = True
    return lambda texts: [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def extend_spm(base_ref, cfg: dict[str, Any], seed: int, new_text: dict[str, list[str]], old_docs: list[str],
               layout: Layout, timings: dict[str, float]) -> Extension:
    from cpt.tok.sampling import interleave, lines_of, vocab_size_for

    base = se.load_proto(base_ref.file)
    se.check_base(base, base_ref.file)
    old_lines = lines_of(old_docs)
    t = time.perf_counter()
    ranked: dict[str, list[str]] = {}
    for lang, lines in new_text.items():
        tc = se.TrainConfig(
            vocab_size=vocab_size_for(cfg, lang), model_type=cfg["model_type"],
            character_coverage=float(cfg["character_coverage"]), num_threads=cfg["num_threads"], seed=seed,
        )
        ranked[lang] = se.ranked_pieces(se.train_new_model(lines, base, tc))
        log.info("%s: trained %d pieces on %d lines", lang, len(ranked[lang]), len(lines))
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    threads = cfg["num_threads"]
    sp_base = se.processor(base)
    hf_base = hf_encoder(hf_export.build_tokenizer(base, add_bos=False))
    docs = exact.View("documents", old_docs, hf_base)
    docs.base_ids = hf_base(old_docs)
    lines = exact.View("lines", old_lines, lambda xs: sp_base.encode(xs, num_threads=threads))
    conflicts = se.old_conflicts(base, old_lines, num_threads=threads, encoded=docs.base_ids)
    guard = None
    if cfg["guard"] != "exact":
        guard = Guard(old_lines, new_text, min_freq=float(cfg["old_alphabet_min_freq"]),
                      foreign_ratio=float(cfg["foreign_ratio"]), mode=cfg["guard"])
    lexicon_info: dict[str, int] = {}
    if cfg["guard"] == "lexicon":
        from cpt.tok import lexicon

        t_lex = time.perf_counter()
        forms = lexicon.word_forms(int(cfg["lexicon_size"]), old_lines, new_text)
        guard.lexicon = lexicon.spm_conflicts(base, forms, num_threads=threads)
        lexicon_info = lexicon.summary(forms, guard.lexicon)
        timings["lexicon"] = time.perf_counter() - t_lex
    base_pieces = {p.piece for p in base.pieces}
    base_normal = {p.piece for p in base.pieces if p.type == se.NORMAL}
    kept, counts = choose(interleave(ranked), base_pieces, base_normal, conflicts, guard, cfg["max_added"])

    def build(pieces: list[str]) -> exact.Built:
        merged, _ = se.merge(base, pieces)
        sp = se.processor(merged)
        return exact.Built(
            {"documents": hf_encoder(hf_export.build_tokenizer(merged, add_bos=False)),
             "lines": lambda xs: sp.encode(xs, num_threads=threads)},
            lambda i: merged.pieces[i].piece)

    def prune(pieces: list[str], fired: set[str]) -> list[str]:
        return se.reachable([p for p in pieces if p not in fired], base_normal)

    n_before = len(kept)
    kept, _, summary = exact.fixed_point(kept, build, [docs, lines], prune)
    log.info("exactness fixed point: %d rounds, %d pieces pruned (%s)", summary["rounds"], n_before - len(kept),
             ", ".join(summary["examples"]))
    timings["choose"] = time.perf_counter() - t

    t = time.perf_counter()
    merged, added = se.merge(base, kept)
    out = layout.tokenizer
    hf_export.write_folder(merged, out, base_ref.folder)
    write_json(out / "new_tokens.json", new_tokens(base, merged, added))
    timings["write"] = time.perf_counter() - t

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    # SentencePiece never matches special-token strings inside text; compare like with like.
    hf._tokenizer.encode_special_tokens = True
    sp_new = se.processor(merged)
    return Extension(
        kind="sentencepiece",
        base_file=base_ref.file,
        base_vocab=len(base.pieces),
        added=added,
        encode_base=lambda lines: sp_base.encode(lines, num_threads=threads),
        encode=lambda lines: sp_new.encode(lines, num_threads=threads),
        encode_hf=lambda lines: [e.ids for e in hf._tokenizer.encode_batch(lines, add_special_tokens=False)],
        decode_hf=lambda ids: hf.decode(ids),
        decode_base=lambda ids: sp_base.decode(ids),
        encode_docs_base=hf_base,
        encode_docs=hf_encoder(Tokenizer.from_file(str(out / "tokenizer.json"))),
        token=lambda i: merged.pieces[i].piece,
        pruned_verified=n_before - len(kept),
        exact_rounds=summary["rounds"],
        extra={"chooser_docs": len(old_docs), "chooser_lines": len(old_lines),
               "in_old_letters": in_letters_of(old_lines), **lexicon_info},
        **counts,
    )
