"""Atomic writes: a failed write leaves the previous file or directory intact."""

from __future__ import annotations

from pathlib import Path

import pytest

from soaes_core.atomic import atomic_dir, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "二")
    assert p.read_text(encoding="utf-8") == "二"
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]
    atomic_write_json(tmp_path / "j.json", {"k": "国资委"})
    assert "国资委" in (tmp_path / "j.json").read_text(encoding="utf-8")


def test_atomic_dir_success_and_failure(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("v1")
    assert (target / "x").read_text() == "v1"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "x").write_text("v2-partial")
        raise RuntimeError("killed mid-write")
    assert (target / "x").read_text() == "v1"
    with atomic_dir(target) as tmp:
        (tmp / "y").write_text("v3")
    assert sorted(p.name for p in target.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_recovers_interrupted_swap(tmp_path: Path) -> None:
    target = tmp_path / "out"
    old = tmp_path / ".out.old"
    old.mkdir()
    (old / "x").write_text("previous")  # a kill happened after moving the old dir aside
    with atomic_dir(target) as tmp:
        assert (target / "x").read_text() == "previous"
        (tmp / "x").write_text("new")
    assert (target / "x").read_text() == "new" and not old.exists()
