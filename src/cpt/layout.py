"""Where every artifact lives, relative to the project root.

dvc.yaml names the same paths; keeping them in one place lets tests run any stage inside a temporary folder
(``Layout(tmp_path)``) exactly as ``dvc repro`` runs it at the repo root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    # -- data (DVC outputs, git-ignored) --
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def raw(self) -> Path:
        return self.data / "raw"

    @property
    def clean(self) -> Path:
        return self.data / "clean"

    @property
    def base(self) -> Path:
        return self.data / "base"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer"

    @property
    def shards(self) -> Path:
        return self.data / "shards"

    @property
    def checkpoints(self) -> Path:
        return self.data / "checkpoints"

    @property
    def model(self) -> Path:
        return self.data / "models" / "cpt"

    # -- small, git-tracked --
    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def metrics_file(self, stage: str) -> Path:
        return self.metrics / f"{stage}.json"

    def resolve(self, path: str | Path) -> Path:
        """A param path: absolute as given, ``remote://<name>/...`` through the project's DVC config
        (``cpt.dvc_paths``: the corpora, found the same in DVC's temporary and queued workspaces), else relative to
        the project root (never to the CWD)."""
        from cpt import dvc_paths

        if dvc_paths.is_remote(path):
            return dvc_paths.resolve(path, self.root)
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p)
