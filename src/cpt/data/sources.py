"""Ingest's sources: the ``ingest.sources`` entries parsed and checked before any work, and one reader per format
(.jsonl(.gz), .parquet, .txt with its units, SQuAD-style .json, streamed ``hf`` datasets). Readers yield
``(line, id, text)`` or a ``Reject`` naming file, line and reason; nothing is dropped silently."""

from __future__ import annotations

import glob
import gzip
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cpt.data.records import DOMAINS, ROLES
from cpt.errors import ConfigError, DataError
from cpt.layout import Layout

DEFAULT_CORPUS_DIR = "../shared/corpora"  # ingest.corpus_dir: where relative source paths are found
SOURCE_KEYS = {
    "name", "path", "hf", "config", "split", "lang", "domain", "role", "text_field", "id_field", "max_docs", "unit",
    "sample", "data_files",
}


UNITS = ("line", "wikitext", "blank", "file")


SAMPLES = ("first", "uniform")


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# WikiText article titles: " = Title = " (one '=' each side); sections are " = = Sec = = " and are not matched.
_WIKITEXT_TITLE = re.compile(r"^ ?= [^=].* = ?$")


@dataclass(frozen=True)
class Source:
    """One entry of ``ingest.sources``, validated."""

    name: str
    lang: str
    domain: str
    role: str
    path: str | None = None
    hf: str | None = None
    config: str | None = None
    data_files: Any = None  # hf only: local or remote files for a packaged builder (hf: json / parquet / text)
    split: str = "train"
    text_field: str = "text"
    id_field: str = "id"
    max_docs: int | None = None
    unit: str = "line"
    sample: str = "first"
    files: tuple[Path, ...] = field(default=(), compare=False)

    @property
    def fmt(self) -> str:
        return "hf" if self.hf else _format_of(self.files[0])


@dataclass
class Reject:
    """A record that could not become a document; written to rejects.jsonl."""

    file: str
    line: int
    reason: str
    detail: str = ""


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in ((".jsonl.gz", "jsonl"), (".json.gz", "jsonl"), (".jsonl", "jsonl"), (".parquet", "parquet"),
                        (".txt.gz", "txt"), (".txt", "txt"), (".json", "squad")):
        if name.endswith(suffix):
            return fmt
    return ""


def parse_sources(cfg: dict[str, Any], layout: Layout) -> list[Source]:
    """Validate every source before any work: names, keys, roles, formats, and that the files exist."""
    raw_sources = cfg.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise ConfigError("ingest.sources: expected a non-empty list of sources")
    corpus_dir = layout.resolve(cfg.get("corpus_dir", DEFAULT_CORPUS_DIR))
    seen: set[str] = set()
    out: list[Source] = []
    for i, src in enumerate(raw_sources):
        where = f"ingest.sources[{i}]"
        if not isinstance(src, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(src).__name__}")
        name = src.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"{where}: 'name' must be a file-name-safe string ([A-Za-z0-9_.-]), got {name!r}")
        where = f"ingest source {name!r}"
        if name in seen:
            raise ConfigError(f"{where}: duplicate source name")
        seen.add(name)
        unknown = set(src) - SOURCE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(SOURCE_KEYS)}")
        for key in ("lang", "domain", "role"):
            if not isinstance(src.get(key), str) or not src[key]:
                raise ConfigError(f"{where}: '{key}' is required")
        if src["domain"] not in DOMAINS:
            raise ConfigError(f"{where}: domain must be one of {DOMAINS}, got {src['domain']!r}")
        if src["role"] not in ROLES:
            raise ConfigError(f"{where}: role must be one of {ROLES}, got {src['role']!r}")
        if ("path" in src) == ("hf" in src):
            raise ConfigError(f"{where}: give exactly one of 'path' (file or glob) or 'hf' (dataset id)")
        max_docs = src.get("max_docs")
        if max_docs is not None and (not isinstance(max_docs, int) or isinstance(max_docs, bool) or max_docs < 1):
            raise ConfigError(f"{where}: max_docs must be a positive integer or null, got {max_docs!r}")
        unit = src.get("unit", "line")
        if unit not in UNITS:
            raise ConfigError(f"{where}: unit must be one of {UNITS}, got {unit!r}")
        sample = src.get("sample", "first")
        if sample not in SAMPLES:
            raise ConfigError(f"{where}: sample must be one of {SAMPLES}, got {sample!r}")
        files: tuple[Path, ...] = ()
        if "path" in src:
            pattern = str(layout.resolve(corpus_dir / str(src["path"])))
            files = tuple(sorted(Path(p) for p in glob.glob(pattern)))
            if not files:
                raise DataError(f"{where}: no file matches {pattern}")
            for f in files:
                if not f.is_file():
                    raise DataError(f"{where}: {f} is not a file")
                if not _format_of(f):
                    raise DataError(
                        f"{where}: {f}: unknown format; expected .txt, .jsonl, .jsonl.gz, .json.gz, .parquet or SQuAD-style .json"
                    )
        else:
            try:
                import datasets  # noqa: F401
            except ImportError as exc:  # pragma: no cover - datasets is in the data extra
                raise ConfigError(f"{where}: 'hf' sources need the `datasets` package (pip install cpt[data])") from exc
        out.append(Source(
            name=name, lang=src["lang"], domain=src["domain"], role=src["role"], path=src.get("path"),
            hf=src.get("hf"), config=src.get("config"), split=src.get("split", "train"),
            data_files=_resolve_files(src.get("data_files"), corpus_dir, layout),
            text_field=src.get("text_field", "text"), id_field=src.get("id_field", "id"), max_docs=max_docs,
            unit=unit, sample=sample, files=files,
        ))
    return out


def _resolve_files(files: Any, corpus_dir: Path, layout: Layout) -> Any:
    """hf ``data_files`` relative to the corpus folder, like ``path`` (URLs and absolute paths unchanged)."""
    if files is None:
        return None
    if isinstance(files, str):
        return files if "://" in files else str(layout.resolve(corpus_dir / files))
    if isinstance(files, list):
        return [_resolve_files(f, corpus_dir, layout) for f in files]
    if isinstance(files, dict):
        return {k: _resolve_files(v, corpus_dir, layout) for k, v in files.items()}
    raise ConfigError(f"data_files must be a path, a list or a mapping, got {type(files).__name__}")


def _binary_lines(path: Path) -> Iterator[tuple[int, bytes | Reject]]:
    """Raw lines of a possibly gzipped file; a truncated/corrupt gzip ends the file with one Reject."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):  # noqa: B007 - lineno used after the loop
                yield lineno, line
    except (EOFError, OSError, zlib.error) as exc:
        yield lineno + 1, Reject(str(path), lineno + 1, "corrupt file", f"{type(exc).__name__}: {exc}")


def _decode(path: Path, lineno: int, raw: bytes) -> str | Reject:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject(str(path), lineno, "invalid UTF-8", f"byte {exc.start}: {raw[max(0, exc.start - 20):exc.start + 20]!r}")


def _text_lines(path: Path) -> Iterator[tuple[int, str | Reject]]:
    """Decoded lines; an undecodable line comes as its Reject (the file goes on), a corrupt gzip ends the file."""
    for lineno, raw in _binary_lines(path):
        yield lineno, raw if isinstance(raw, Reject) else _decode(path, lineno, raw)


def read_jsonl(path: Path, src: Source) -> Iterator[tuple[int, str | None, str] | Reject]:
    for lineno, line in _text_lines(path):
        if isinstance(line, Reject):
            yield line
            continue
        if not line.strip():
            continue  # blank lines between records are formatting, not data
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Reject(str(path), lineno, "not JSON", f"{exc.msg} at column {exc.colno}: {line[:80]!r}")
            continue
        if not isinstance(obj, dict):
            yield Reject(str(path), lineno, "not a JSON object", f"got {type(obj).__name__}")
            continue
        yield from _record(path, lineno, obj, src)


def _record(path: Path, lineno: int, obj: dict, src: Source) -> Iterator[tuple[int, str | None, str] | Reject]:
    if src.text_field not in obj:
        yield Reject(str(path), lineno, "no text field", f"missing {src.text_field!r}; keys: {sorted(obj)[:10]}")
        return
    text = obj[src.text_field]
    if not isinstance(text, str):
        yield Reject(str(path), lineno, "text not a string", f"{src.text_field!r} is {type(text).__name__}")
        return
    own = obj.get(src.id_field)
    yield lineno, (None if own is None else str(own)), text


def read_parquet(path: Path, src: Source) -> Iterator[tuple[int, str | None, str] | Reject]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - any pyarrow failure is a corrupt file
        yield Reject(str(path), 0, "corrupt file", f"{type(exc).__name__}: {exc}")
        return
    names = pf.schema_arrow.names
    if src.text_field not in names:
        raise DataError(f"ingest source {src.name!r}: {path}: no column {src.text_field!r}; columns: {names}")
    cols = [src.text_field] + ([src.id_field] if src.id_field in names else [])
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=4096):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            row += 1
            yield from _record(path, row, {k: data[k][i] for k in cols if data[k][i] is not None}, src)


def read_squad(path: Path, src: Source) -> Iterator[tuple[int, str | None, str] | Reject]:
    """SQuAD v1.1 layout (``data[].paragraphs[].context``): one document per distinct context, id ``<title>/<n>``;
    the 'line' of a document is its paragraph's position (1-based) in the file."""
    raw = path.read_bytes()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"ingest source {src.name!r}: {path}: invalid UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"ingest source {src.name!r}: {path}: not JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise DataError(f"ingest source {src.name!r}: {path}: .json must be SQuAD-style ({{'data': [...]}})")
    seen: set[str] = set()
    n = 0
    for a, article in enumerate(obj["data"]):
        title = str(article.get("title", a)) if isinstance(article, dict) else str(a)
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            yield Reject(str(path), n + 1, "no paragraphs", f"article {a} ({title!r}) has no 'paragraphs' list")
            continue
        for p, para in enumerate(paragraphs):
            n += 1
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str):
                yield Reject(str(path), n, "no text field", f"article {a} paragraph {p} has no string 'context'")
                continue
            if context in seen:  # the same context under several question groups
                continue
            seen.add(context)
            yield n, f"{title}/{p}", context


def read_hf(src: Source) -> Iterator[tuple[int, str | None, str] | Reject]:
    import datasets

    try:
        ds = datasets.load_dataset(src.hf, src.config, data_files=src.data_files, split=src.split, streaming=True)
        for row, obj in enumerate(ds, 1):
            yield from _record(Path(f"hf:{src.hf}"), row, obj, src)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - network, auth, missing config: name the source, stop the stage
        raise DataError(f"ingest source {src.name!r}: cannot stream hf dataset {src.hf!r}: {exc}") from exc


def read_txt(path: Path, src: Source) -> Iterator[tuple[int, str | None, str] | Reject]:
    """Plain text, one document per ``src.unit``; a line with invalid UTF-8 is rejected, its document kept."""
    buf: list[str] = []
    start = 0

    def flush() -> Iterator[tuple[int, str | None, str]]:
        text = "\n".join(buf).strip("\n")
        if text.strip():
            yield start, None, text

    for lineno, line in _text_lines(path):
        if isinstance(line, Reject):
            yield line
            continue
        line = line.rstrip("\r\n")
        if src.unit == "line":
            if line.strip():
                yield lineno, None, line
            continue
        boundary = (src.unit == "wikitext" and _WIKITEXT_TITLE.match(line)) or (
            src.unit == "blank" and not line.strip()
        )
        if boundary:
            yield from flush()
            buf, start = [], lineno
        if src.unit == "blank" and not line.strip():
            continue
        if not buf:
            start = lineno
        buf.append(line)
    if src.unit != "line":
        yield from flush()


def iter_source(src: Source) -> Iterator[tuple[str, int, str | None, str] | Reject]:
    """(file, line, own id, text) for every candidate document of a source, in file order."""
    if src.hf:
        for item in read_hf(src):
            yield item if isinstance(item, Reject) else (f"hf:{src.hf}", *item)
        return
    reader = {"jsonl": read_jsonl, "parquet": read_parquet, "txt": read_txt, "squad": read_squad}
    for path in src.files:
        for item in reader[_format_of(path)](path, src):
            yield item if isinstance(item, Reject) else (str(path), *item)
