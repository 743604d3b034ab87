"""Paths that must mean the same in DVC's temporary and queued experiment workspaces as in the project itself.

``remote://<name>/<path>`` in params: a folder outside the repo, located through the project's DVC config.

Why not a plain relative path (``../shared/corpora``): DVC runs ``dvc exp run --temp`` and queued experiments
(``dvc exp run --queue`` + ``dvc queue start``) in a git copy of the project under ``.dvc/tmp/exps/``, where
``../shared`` points into ``.dvc/tmp/`` and nothing is found. What DVC does carry into that copy is the *local* DVC
config (``.dvc/config.local``, git-ignored: ``dvc remote add --local``), with relative paths made absolute
(``TempDirExecutor.init_git`` -> ``_update_config(repo.config.read("local"))``). So the corpora are a DVC remote,
``corpora``: dvc.yaml names the corpus files as ``remote://corpora/<file>`` deps (DVC resolves those itself), params
name the folder ``remote://corpora`` (resolved here, the same way, without importing dvc), and the one location
holds in the workspace, in ``--temp`` copies and in queued runs, for a pipeline at the repo root or in a subfolder
(the config is found by walking up to the ``.dvc`` folder). ``.dvc/config`` holds a default relative to the repo
(``../../shared/corpora``, from ``.dvc/``); ``make setup`` writes it into ``.dvc/config.local`` so DVC copies it.

``origin_root``: the project folder DVC was started in, for what must outlive a temporary copy (the MLflow store,
its artifacts and spool: a relative ``sqlite:///mlflow.db`` would otherwise be written inside the copy and deleted
with it). DVC tells every stage of an experiment the repo it was started from in ``DVC_ROOT``
(``BaseStashQueue._stash_exp``: "point to the parent DVC repo root (and not an executor tempdir root)").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cpt.errors import ConfigError

PREFIX = "remote://"
_SECTION = re.compile(r"^\s*(\[+)\s*(.*?)\s*\]+\s*$")
_NAMED = re.compile(r"""^'?\s*remote\s+"([^"]+)"\s*'?$""")
_URL = re.compile(r"""^\s*url\s*=\s*(.*?)\s*$""")


def is_remote(path: str | Path) -> bool:
    """True for ``remote://name/...`` (also after ``Path()`` collapsed the double slash: ``remote:/name/...``)."""
    return str(path).startswith(("remote://", "remote:/"))


def dvc_dir(start: Path) -> Path | None:
    """The ``.dvc`` folder of the DVC project ``start`` is in (``start`` itself or the nearest parent)."""
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder / ".dvc"
    return None


def _remote_url(config: Path, name: str) -> str | None:
    """``url`` of remote ``name`` in one DVC (ConfigObj) config file, None when absent. Two spellings: DVC's own
    ``['remote "name"']``, and the nested ``[remote]`` / ``[[name]]`` that DVC writes into an experiment's copy."""
    if not config.is_file():
        return None
    outer, current = None, None
    for line in config.read_text(encoding="utf-8").splitlines():
        m = _SECTION.match(line)
        if m:
            depth, title = len(m.group(1)), m.group(2).strip("'\"").strip()
            if depth == 1:
                outer = title.lower()
                named = _NAMED.match(m.group(2).strip())
                current = named.group(1).lower() if named else None
            else:
                current = title.lower() if outer == "remote" else None
        elif current == name.lower():
            u = _URL.match(line)
            if u:
                return u.group(1).strip("'\"")
    return None


def remote_url(dvc: Path, name: str) -> tuple[Path, Path] | None:
    """``(folder, config file)`` of remote ``name``: config.local wins over config (DVC's order); a relative url is
    relative to the ``.dvc`` folder, as DVC reads it."""
    for config in (dvc / "config.local", dvc / "config"):
        url = _remote_url(config, name)
        if url is not None:
            if "://" in url:
                raise ConfigError(f"{config}: remote '{name}' is {url}; cpt reads corpora from a local folder only")
            path = Path(url).expanduser()
            return (path if path.is_absolute() else (dvc / path)).resolve(), config
    return None


def resolve(path: str | Path, root: Path) -> Path:
    """``remote://corpora/xcopa`` -> the absolute folder, for the project at ``root``."""
    text = str(path)
    rest = text[len(PREFIX):] if text.startswith(PREFIX) else text[len("remote:/"):]
    name, _, sub = rest.partition("/")
    dvc = dvc_dir(Path(root).resolve())
    found = remote_url(dvc, name) if dvc is not None else None
    if found is None:
        where = f"{dvc}/config.local or {dvc}/config" if dvc else f"{root} (no .dvc folder here or above)"
        raise ConfigError(f"{text}: no DVC remote '{name}' in {where}; add one: "
                          f"dvc remote add --local {name} /path/to/the/folder")
    return found[0] / sub if sub else found[0]


def origin_root(root: Path) -> Path:
    """``root`` in the workspace DVC was started in, when ``root`` is inside a temporary experiment copy (a
    pipeline in a subfolder maps to the same subfolder there); ``root`` itself otherwise."""
    root = Path(root).resolve()
    started = os.environ.get("DVC_ROOT")
    dvc = dvc_dir(root)
    if not started or dvc is None:
        return root
    repo, origin = dvc.parent, Path(started).resolve()
    if repo == origin or origin not in repo.parents:  # not a copy under <origin>/.dvc/tmp/
        return root
    return origin / root.relative_to(repo)
