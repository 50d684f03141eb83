"""One `soaes pipeline run` per run folder: a second run refuses in one line naming the holder, `plan` still works,
nothing is corrupted, and the lock of a run that died (even with a forked child alive) is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from click.testing import CliRunner

from soaes.cli import main
from soaes.pipeline import load_pipeline_recipe, plan_pipeline, stage_dirname
from soaes.pipeline.runner import LOCK_FILE
from soaes.pipeline.stages import PAUSE_ENV
from soaes_core import verify_outputs
from soaes_core.cache import owner_lock

SOAES = [sys.executable, "-c", "from soaes.cli import main; main()"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {path}: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.1)


def test_second_run_refuses_and_nothing_is_corrupted(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "lock", "stages": ["pack"], "pack": {
        "max_length": 128, "cpt_data": "sample:corpus/articles.jsonl"}}), encoding="utf-8")
    run, gate = tmp_path / "run", tmp_path / "gate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    first = subprocess.Popen([*SOAES, "pipeline", "run", str(recipe), "-o", str(run)], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**env, PAUSE_ENV: f"pack:after_cpt={gate}"})
    try:
        _wait_for(gate.with_name("gate.waiting"), first)  # the first run holds the folder, half-way through pack
        second = subprocess.run([*SOAES, "pipeline", "run", str(recipe), "-o", str(run)], text=True,
                                capture_output=True, env=env, timeout=300)
        assert second.returncode == 2, second.stderr
        lines = [ln for ln in (second.stdout + second.stderr).splitlines() if ln.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: run folder {run} is in use by pid {first.pid} on {socket.gethostname()}")
        plan = CliRunner().invoke(main, ["pipeline", "plan", str(recipe), "-o", str(run)])  # needs no lock
        assert plan.exit_code == 0, plan.output
        assert f"note: a run is using this folder (pid {first.pid} on" in plan.output
        gate.touch()
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    stages = run / "stages"
    assert verify_outputs(stages / stage_dirname("pack")) == []
    assert not [p.name for p in stages.iterdir() if p.name.startswith(".")]  # no partial or old folders
    assert {p.status for p in plan_pipeline(load_pipeline_recipe(recipe), run)} == {"up-to-date"}
    res = CliRunner().invoke(main, ["pipeline", "run", str(recipe), "-o", str(run)])  # the lock was released
    assert res.exit_code == 0 and "pack: up to date" in res.output, res.output


HOLDER = """
import os, signal, sys, time
from soaes_core.cache import owner_lock
with owner_lock(sys.argv[1]):
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # a worker forked while the lock is held (datatrove, dataloaders) outlives its parent
        os.write(w, b"1")
        time.sleep(120)
        os._exit(0)
    os.read(r, 1)  # the child is running
    print(child, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / "run" / LOCK_FILE
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline()  # not communicate(): the forked child keeps the pipe open
    assert holder.wait(timeout=120) == -signal.SIGKILL
    child = int(line)
    try:
        os.kill(child, 0)  # the forked worker is still alive
        stale = json.loads(lock.read_text(encoding="utf-8"))
        assert stale["pid"] == holder.pid and stale["host"] == socket.gethostname()
        with owner_lock(lock, what="run folder") as previous:
            assert previous == stale
            assert json.loads(lock.read_text(encoding="utf-8"))["pid"] == os.getpid()
        assert lock.read_text(encoding="utf-8") == ""  # released: names no holder
    finally:
        os.kill(child, signal.SIGKILL)
        holder.stdout.close()
