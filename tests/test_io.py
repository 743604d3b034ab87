import json
import math

import pytest

from cpt.io import atomic_open, read_jsonl, write_json, write_jsonl, write_metrics


def test_atomic_open_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as fh:
            fh.write("new")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_metrics_are_valid_json_without_nan(tmp_path):
    path = tmp_path / "m.json"
    write_metrics(path, {"b": float("nan"), "a": [1.0, float("inf")]})
    assert json.loads(path.read_text()) == {"a": [1.0, None], "b": None}


def test_jsonl_roundtrip_keeps_unicode(tmp_path):
    rows = [{"text": "Tiếng Việt"}, {"text": "中文"}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    assert "Tiếng Việt" in (tmp_path / "a.jsonl").read_text(encoding="utf-8")
    assert list(read_jsonl(tmp_path / "a.jsonl")) == rows


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(read_jsonl(path))


def test_atomic_files_get_umask_permissions_not_0600(tmp_path, monkeypatch):
    """mkstemp creates 0600 files: a model or metrics file only its writer can read breaks shared GPU hosts."""
    import cpt.io

    monkeypatch.setattr(cpt.io, "_UMASK", 0o022)
    with atomic_open(tmp_path / "f.txt") as fh:
        fh.write("x")
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


def test_replace_dir_never_leaves_a_moment_without_the_folder(tmp_path, monkeypatch):
    """Issue 24 point 10: the swap of data/clean was two renames, with no data/clean between them."""
    import os
    import shutil

    from cpt import io

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    if not hasattr(io, "_exchange"):
        pass  # the old code: the assertions below show its gap
    elif not io._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this filesystem has no atomic exchange (the fallback is tested below)")
    (tmp_path / "a").rmdir(), (tmp_path / "b").rmdir()
    out, tmp = tmp_path / "clean", tmp_path / ".clean.tmp"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    seen = []
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(a, b):
        seen.append(out.exists())
        real_replace(a, b)
        seen.append(out.exists())

    def rmtree(path, *args, **kwargs):
        seen.append(out.exists())
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(io.os, "replace", replace)
    monkeypatch.setattr(io.shutil, "rmtree", rmtree)
    io.replace_dir(tmp, out)
    assert seen and all(seen), seen  # out existed at every step of the swap
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]


def test_replace_dir_without_an_atomic_exchange_recovers_an_interrupted_swap(tmp_path, monkeypatch):
    from cpt import io

    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # e.g. not Linux, or a filesystem without it
    out, old, tmp = tmp_path / "clean", tmp_path / ".clean.old", tmp_path / ".clean.tmp"
    old.mkdir()  # a crash between the two renames: the old folder moved aside, no clean
    (old / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    io.replace_dir(tmp, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and not old.exists() and not tmp.exists()
