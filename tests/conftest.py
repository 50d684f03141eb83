"""Fixtures of the root tests: one uninterrupted `soaes demo --quick` run, shared by every pipeline test module."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from soaes.cli import main
from soaes.pipeline.runner import LOCK_FILE


def run_demo_quick(out: Path, *extra: str, env: dict[str, str] | None = None) -> object:
    """`soaes demo --quick -o OUT --set threads=1 EXTRA...` in this process (click's result)."""
    # one torch thread: on a shared CI machine two threads can be several times slower (threads are not hashed)
    return CliRunner().invoke(main, ["demo", "--quick", "-o", str(out), "--set", "threads=1", *extra], env=env)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """The run folder of one uninterrupted `soaes demo --quick` (do not change it: copy it with `linked_copy`); its
    printed output is kept beside it, in `demo-output.txt`."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    res = run_demo_quick(out)
    assert res.exit_code == 0, res.output
    (out.parent / "demo-output.txt").write_text(res.output, encoding="utf-8")  # what the user saw (stdout + stderr)
    return out


def linked_copy(run: Path, dst: Path) -> Path:
    """A copy of run folder `run` made of hard links (stages replace folders, never edit files); the run lock is a
    file of its own, so locking the copy never touches the original."""
    shutil.copytree(run, dst, copy_function=os.link, ignore=shutil.ignore_patterns(LOCK_FILE))
    return dst


@pytest.fixture()
def copy_quick_run(quick_run: Path, tmp_path: Path):
    """Make a hard-linked copy of the shared quick run: `copy_quick_run(name)` → its path under this test's tmp."""
    return lambda name="run": linked_copy(quick_run, tmp_path / name)
