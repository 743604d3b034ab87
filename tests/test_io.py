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
