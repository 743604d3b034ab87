"""The document record every data stage reads and writes.

One JSON object per line, each source a folder of zstd-compressed shards: ``data/raw/<source>/part-NNNNN.jsonl.zst``
and ``data/clean/<source>/part-NNNNN.jsonl.zst`` (``cpt.data.shardio``), each folder with a ``manifest.json`` listing
its sources and, per source, its shards with their document count, text bytes and sha256. A source written as one
plain ``<source>.jsonl`` (the format before shards, and what small tests write) is read the same way. Fields:

    id      stable document id, "<source>/<n>" or the source's own id prefixed with the source name
    source  the ``ingest.sources[].name`` it came from
    lang    ISO 639-1 code (vi, en, zh, ja, ko, ...)
    domain  "new" (the language being learned) or "old" (the language to keep)
    role    "train" or "eval"; eval documents never reach tokenizer training or training shards
    text    the document, UTF-8

Downstream stages go through ``iter_docs`` / ``shard_paths`` with filters, never by globbing files, so the role barrier
is in one place and a change of the on-disk format changes only this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cpt.data.shardio import read_records
from cpt.io import read_json, write_json

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
    file: str  # the source's shard folder (or, unsharded, its .jsonl file) inside the folder
    docs: int
    shards: tuple[dict[str, Any], ...] = ()  # {file, docs, bytes, sha256}, file relative to ``file``

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["shards"] = [dict(s) for s in self.shards]
        if not d["shards"]:
            del d["shards"]
        return d

    def paths(self, folder: Path) -> list[Path]:
        """The source's files in reading order."""
        base = Path(folder) / self.file
        return [base / s["file"] for s in self.shards] if self.shards else [base]


def write_manifest(folder: Path, sources: list[SourceInfo]) -> None:
    write_json(Path(folder) / MANIFEST, {"sources": [s.to_dict() for s in sources]})


def read_manifest(folder: Path) -> list[SourceInfo]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; run the stage that writes {folder} first")
    return [SourceInfo(**{**s, "shards": tuple(s.get("shards") or ())}) for s in read_json(path)["sources"]]


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
    """Documents of the matching sources, in manifest order then shard and line order (deterministic)."""
    paths = shard_paths(folder, role=role, domain=domain, lang=lang, name=name)
    for path in paths:
        yield from read_records(path)


def shard_paths(
    folder: Path,
    *,
    role: str | None = None,
    domain: str | None = None,
    lang: str | None = None,
    name: str | None = None,
) -> list[Path]:
    """The files of the matching sources in reading order (for readers that take shards in parallel)."""
    return [p for s in select_sources(folder, role=role, domain=domain, lang=lang, name=name)
            for p in s.paths(folder)]
