"""The SentencePiece-base path of the stage: train -> choose -> merge -> export -> the encoders the checks use."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cpt.io import write_json
from cpt.layout import Layout
from cpt.tok import hf_export
from cpt.tok import spm_extend as se
from cpt.tok.guard import Guard

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


def extend_spm(base_ref, cfg: dict[str, Any], seed: int, new_text: dict[str, list[str]], old_text: list[str],
               layout: Layout, timings: dict[str, float]) -> Extension:
    from cpt.tok.sampling import interleave, vocab_size_for

    base = se.load_proto(base_ref.file)
    se.check_base(base, base_ref.file)
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
    conflicts = se.old_conflicts(base, old_text, num_threads=cfg["num_threads"])
    guard = None
    if cfg["guard"] == "native":
        guard = Guard(old_text, new_text,
                      min_freq=float(cfg["old_alphabet_min_freq"]), foreign_ratio=float(cfg["foreign_ratio"]))
    base_pieces = {p.piece for p in base.pieces}
    base_normal = {p.piece for p in base.pieces if p.type == se.NORMAL}
    kept, counts = choose(interleave(ranked), base_pieces, base_normal, conflicts, guard, cfg["max_added"])
    timings["choose"] = time.perf_counter() - t

    t = time.perf_counter()
    merged, added = se.merge(base, kept)
    out = layout.tokenizer
    hf_export.write_folder(merged, out, base_ref.folder)
    write_json(out / "new_tokens.json", new_tokens(base, merged, added))
    timings["write"] = time.perf_counter() - t

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    # SentencePiece never matches special-token strings inside text; compare like with like.
    hf._tokenizer.encode_special_tokens = True
    sp_base, sp_new = se.processor(base), se.processor(merged)
    threads = cfg["num_threads"]
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
        **counts,
    )
