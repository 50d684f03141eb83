"""Atomic writes: a failed write leaves the previous file or directory intact."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from soaes_core.atomic import (
    STALE_TEMP_AGE_S,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
    temp_path,
)
from soaes_core.testing.killed import killed_atomic_writer, killed_file_write, writer_command


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


# --- temps left by killed writers (issue 15, defect 9) ------------------------------------------------------

def _temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_next_atomic_dir_removes_temp_of_a_killed_atomic_writer(tmp_path: Path) -> None:
    target = tmp_path / "stages" / "03_dedup"
    killed_atomic_writer(target)
    assert len(_temps(target.parent)) == 1 and not target.exists()  # the leak the kill leaves
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("v")
    assert _temps(target.parent) == [] and (target / "x").read_text() == "v"


def test_live_writers_temp_is_kept_until_it_dies(tmp_path: Path) -> None:
    target = tmp_path / "out"
    child = subprocess.Popen(writer_command(target, "live"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"writing\n"
        live = _temps(tmp_path)
        assert len(live) == 1 and f"p{child.pid}-" in live[0]
        assert remove_stale_temps(tmp_path) == [] and _temps(tmp_path) == live
        # another process writing the same target meanwhile leaves the live temp alone too
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("other")
        assert _temps(tmp_path) == live
    finally:
        child.kill()
        child.wait()
    assert [p.name for p in remove_stale_temps(tmp_path)] == live
    assert _temps(tmp_path) == []


def test_stale_temp_rules_age_other_targets_and_legacy_names(tmp_path: Path) -> None:
    killed_atomic_writer(tmp_path / "a")
    killed_atomic_writer(tmp_path / "b")
    user_file = tmp_path / ".notes.txt.tmp"  # not one of ours: never touched
    user_file.write_text("mine")
    legacy = tmp_path / ".c.ab12cd34.tmp"  # pre-pid naming: judged by age only
    legacy.mkdir()
    assert [p.name.split(".p")[0] for p in remove_stale_temps(tmp_path, target="a")] == [".a"]
    assert len(_temps(tmp_path)) == 3  # b's temp, the user's file, the young legacy temp
    assert len(remove_stale_temps(tmp_path)) == 1 and legacy.exists()
    old = time.time() - 2 * 3600
    os.utime(legacy, (old, old))
    assert remove_stale_temps(tmp_path) == [legacy]
    assert _temps(tmp_path) == [user_file.name]
    # a tagged temp of another host cannot be checked by pid: removed only once older than the bound
    foreign = tmp_path / ".d.p1-00000000-abcdefgh.tmp"
    foreign.mkdir()
    assert remove_stale_temps(tmp_path) == []
    old = time.time() - STALE_TEMP_AGE_S - 60
    os.utime(foreign, (old, old))
    assert remove_stale_temps(tmp_path) == [foreign]


def test_temp_path_names_are_cleaned_up_like_atomic_ones(tmp_path: Path) -> None:
    """`temp_path` is for writers that rename into place themselves: a dead writer's temp is removable."""
    final = tmp_path / "00003.jsonl"
    mine = temp_path(final)
    assert mine.parent == tmp_path and mine.name.startswith(".00003.jsonl.p") and mine != temp_path(final)
    mine.write_text("live: this process")
    dead = killed_file_write(final)
    assert remove_stale_temps(tmp_path) == [dead] and mine.exists()


def test_atomic_outputs_get_the_umask_modes_of_ordinary_creates(tmp_path: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700; the outputs must read like open()/mkdir() ones (0644/0755 under 022)."""
    old = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inner.txt").write_text("y")
        assert (f.stat().st_mode & 0o777, (tmp_path / "d").stat().st_mode & 0o777) == (0o644, 0o755)
        os.umask(0o077)
        atomic_write_text(tmp_path / "g.txt", "x")
        assert (tmp_path / "g.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
