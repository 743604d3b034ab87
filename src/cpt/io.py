"""Small, dependable file helpers shared by every stage: atomic writes, JSONL, metrics.

Atomic (temp file + ``os.replace``) so a killed stage never leaves a half-written artifact that DVC or a resume
would trust.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[TextIO]:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the final file gets the usual permissions
    binary = "b" in mode
    try:
        with open(tmp, mode, encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def replace_dir(tmp: str | Path, out: str | Path) -> None:
    """Swap a finished folder ``tmp`` in for ``out`` so that ``out`` always exists once it did: on Linux one atomic
    exchange of the two (``renameat2(RENAME_EXCHANGE)``), then the old folder (now at ``tmp``) is deleted. Elsewhere
    two renames via ``.<out>.old``; a crash between them leaves the old folder there, and the next call puts it back
    first. (The two renames used to be the only way: a reader of data/clean, or a crash, could meet no folder.)"""
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(f".{out.name}.old")
    if not out.exists() and old.exists():
        os.replace(old, out)  # an interrupted earlier swap: the old folder comes back before anything else
    shutil.rmtree(old, ignore_errors=True)
    if out.exists() and _exchange(tmp, out):
        shutil.rmtree(tmp)
        return
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where the OS, the
    C library or the filesystem cannot."""
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and paths end up in metrics; make them plain JSON.
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every metrics file parses everywhere (DVC, jq, browsers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    with atomic_open(path) as fh:
        json.dump(_finite(obj), fh, ensure_ascii=False, indent=indent, sort_keys=sort_keys, default=_json_default)
        fh.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def open_text(path: str | Path, mode: str = "rt") -> TextIO:
    """Open .gz transparently; text mode is strict UTF-8 (callers that must survive bad bytes read binary)."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, mode, encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode.replace("t", ""), encoding="utf-8")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=_json_default))
            fh.write("\n")
            n += 1
    return n


def parse_jsonl(lines: Iterable[str | bytes], path: str | Path) -> Iterator[dict[str, Any]]:
    """One JSON object per non-blank line; a bad line is an error naming ``path`` and its line number."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from exc


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with open_text(path) as fh:
        yield from parse_jsonl(fh, path)


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """metrics/<stage>.json: sorted keys, stable formatting, so `dvc metrics diff` and git diffs stay readable."""
    write_json(path, metrics, indent=2, sort_keys=True)


def content_hash(folder: str | Path, *, exclude: frozenset[str] = frozenset(), recursive: bool = False) -> str:
    """blake2b over the relative names and bytes of every file in ``folder`` (sorted): a base with other weights, a
    tokenizer with one piece more or shards with other tokens are other inputs, whatever their config or counts say.
    About 1 s per GB."""
    h = hashlib.blake2b(digest_size=16)
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    files = folder.rglob("*") if recursive else folder.iterdir()
    for path in sorted(p for p in files if p.is_file() and p.name not in exclude):
        h.update(path.relative_to(folder).as_posix().encode("utf-8") + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def shards_content(shards_dir: str | Path) -> dict[str, str]:
    """Content hash per domain folder of data/shards (token blocks, block info, language index): what the shards
    stage records in meta.json as ``content`` and the train stage's resume fingerprint covers."""
    shards_dir = Path(shards_dir)
    return {d.name: content_hash(d, recursive=True) for d in sorted(shards_dir.iterdir()) if d.is_dir()}
