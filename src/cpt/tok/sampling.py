"""Which text the tokenizer extension sees: the base to extend, the new languages, deterministic samples of the new-
language training text and the old-language chooser text (``role: train`` only), and the ``role: eval`` lines every
reported number is measured on."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from cpt.data.records import iter_docs, select_sources
from cpt.errors import ConfigError, DataError
from cpt.layout import Layout

DEFAULT_VOCAB = 8000


def vocab_size_for(cfg: dict[str, Any], lang: str) -> int:
    v = cfg["vocab_size"]
    if isinstance(v, dict):
        v = v.get(lang, DEFAULT_VOCAB)
    if not isinstance(v, int) or v < 100:
        raise ConfigError(f"tokenizer.vocab_size for {lang}: {v!r}; expected an integer >= 100")
    return v


@dataclass(frozen=True)
class Base:
    kind: str  # "spm" | "bpe"
    file: Path  # tokenizer.model or tokenizer.json
    folder: Path | None  # the folder holding HF config files, if any


def find_base(cfg: dict[str, Any], layout: Layout) -> Base:
    path = layout.resolve(cfg["base"]) if cfg["base"] else layout.base
    if path.is_dir():
        if (path / "tokenizer.model").exists():
            return Base("spm", path / "tokenizer.model", path)
        if (path / "tokenizer.json").exists():
            return Base("bpe", path / "tokenizer.json", path)
        raise DataError(f"{path}: tokenizer.base folder has neither tokenizer.model nor tokenizer.json")
    if path.is_file():
        if path.suffix == ".json":
            return Base("bpe", path, path.parent if (path.parent / "tokenizer_config.json").exists() else None)
        return Base("spm", path, path.parent if (path.parent / "tokenizer_config.json").exists() else None)
    hint = " (run `cpt base` first)" if not cfg["base"] else ""
    raise DataError(f"{path}: tokenizer.base not found{hint}")


def _lines(docs: Iterable[dict[str, Any]]) -> Iterator[str]:
    for doc in docs:
        for line in unicodedata.normalize("NFC", doc["text"]).split("\n"):
            if line.strip():
                yield line


def _rank(doc_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "little")


def sample_docs(folder: Path, seed: int, max_chars: int, exclude: frozenset[str] = frozenset(),
                **filters: str) -> list[str]:
    """Whole document texts exactly as data/clean holds them (what the shards stage encodes: newlines, tabs and
    leading spaces included). Over ``max_chars`` (0 = all): documents in the order of a seeded hash of their id until
    the budget is reached, at least one, so a corpus of a few long books still yields text. Deterministic and
    independent of file order; returned in file order. ``exclude``: document ids never taken (the shards stage's
    held-out documents)."""
    sizes = [(_rank(str(d.get("id")), seed), len(d["text"])) for d in iter_docs(folder, **filters)
             if d["text"].strip() and str(d.get("id")) not in exclude]
    chosen: set[int] = set()
    if max_chars and sum(n for _, n in sizes) > max_chars:
        total = 0
        for rank, n in sorted(sizes):
            if total >= max_chars:
                break
            chosen.add(rank)
            total += n
    return [d["text"] for d in iter_docs(folder, **filters)
            if d["text"].strip() and str(d.get("id")) not in exclude
            and (not chosen or _rank(str(d.get("id")), seed) in chosen)]


def heldout_ids(folder: Path, seed: int, val_fraction: float, domain: str) -> frozenset[str]:
    """The ids of the ``role: train`` documents of ``domain`` that the shards stage holds out as val (the same
    ``cpt.data.packing.val_ids`` split, one seed): text that eval scores as held out is never chosen on."""
    from cpt.data.packing import val_ids

    ids = [str(d.get("id")) for d in iter_docs(folder, role="train", domain=domain) if d["text"].strip()]
    return frozenset(val_ids(ids, seed, val_fraction))


def lines_of(docs: Iterable[str]) -> list[str]:
    """The non-blank NFC lines of document texts (the unit of the line-level checks and of new-piece training)."""
    return list(_lines({"text": d} for d in docs))


def sample_lines(folder: Path, seed: int, max_chars: int, **filters: str) -> list[str]:
    """The lines of ``sample_docs``."""
    return lines_of(sample_docs(folder, seed, max_chars, **filters))


def eval_lines(folder: Path, lang: str, limit: int) -> list[str]:
    lines = list(_lines(iter_docs(folder, role="eval", lang=lang)))
    return lines[:limit] if limit else lines


def eval_docs(folder: Path, **filters: str) -> list[str]:
    """Whole ``role: eval`` document texts, unnormalised (as the shards stage would encode them)."""
    return [d["text"] for d in iter_docs(folder, role="eval", **filters) if d["text"].strip()]


def new_languages(cfg: dict[str, Any], layout: Layout) -> list[str]:
    present: list[str] = []
    for s in select_sources(layout.clean, role="train", domain="new"):
        if s.lang not in present:
            present.append(s.lang)
    wanted = list(cfg["languages"] or present)
    missing = [lang for lang in wanted if lang not in present]
    if missing:
        raise DataError(f"{layout.clean}: no role: train, domain: new documents for tokenizer.languages {missing}")
    if not wanted:
        raise DataError(f"{layout.clean}: no role: train, domain: new sources to train new pieces on")
    return wanted


def interleave(ranked: dict[str, list[str]]) -> list[str]:
    """One list, best first, from each language's ranked pieces: by relative rank, so a 4k-piece language and an
    8k-piece one share the top of the priority order fairly."""
    keyed = []
    for li, (lang, pieces) in enumerate(ranked.items()):
        n = max(len(pieces), 1)
        keyed += [(r / n, li, r, p) for r, p in enumerate(pieces)]
    keyed.sort()
    seen: set[str] = set()
    out = []
    for _, _, _, p in keyed:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out
