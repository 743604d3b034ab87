"""The document record every data stage reads and writes.

One JSON object per line, one file per source: ``data/raw/<source>.jsonl`` and ``data/clean/<source>.jsonl``, each
folder with a ``manifest.json`` listing its sources. Fields:

    id      stable document id, "<source>/<n>" or the source's own id prefixed with the source name
    source  the ``ingest.sources[].name`` it came from
    lang    ISO 639-1 code (vi, en, zh, ja, ko, ...)
    domain  "new" (the language being learned) or "old" (the language to keep)
    role    "train" or "eval"; eval documents never reach tokenizer training or training shards
    text    the document, UTF-8

Downstream stages go through ``iter_docs`` with filters, never by globbing files, so the role barrier is in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cpt.io import read_json, read_jsonl, write_json

FIELDS = ("id", "source", "lang", "domain", "role", "text")
DOMAINS = ("new", "old")
ROLES = ("train", "eval")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SourceInfo:
    name: str
    lang: str
    domain: str
    role: str
    file: str  # file name inside the folder
    docs: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def write_manifest(folder: Path, sources: list[SourceInfo]) -> None:
    write_json(Path(folder) / MANIFEST, {"sources": [s.to_dict() for s in sources]})


def read_manifest(folder: Path) -> list[SourceInfo]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; run the stage that writes {folder} first")
    return [SourceInfo(**s) for s in read_json(path)["sources"]]


def select_sources(
    folder: Path,
    *,
    role: str | None = None,
    domain: str | None = None,
    lang: str | None = None,
    name: str | None = None,
) -> list[SourceInfo]:
    out = []
    for s in read_manifest(folder):
        if role is not None and s.role != role:
            continue
        if domain is not None and s.domain != domain:
            continue
        if lang is not None and s.lang != lang:
            continue
        if name is not None and s.name != name:
            continue
        out.append(s)
    return out


def iter_docs(
    folder: Path,
    *,
    role: str | None = None,
    domain: str | None = None,
    lang: str | None = None,
    name: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Documents of the matching sources, in manifest order then file order (deterministic)."""
    for s in select_sources(folder, role=role, domain=domain, lang=lang, name=name):
        yield from read_jsonl(Path(folder) / s.file)
