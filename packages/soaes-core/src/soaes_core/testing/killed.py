"""Reproduce what a writer killed mid-write leaves behind, for the stale-temp cleanup tests."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from .. import atomic

# The child loads atomic.py by path (stdlib only), so it starts in well under a second.
WRITER_SCRIPT = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("atomic_under_test", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
with mod.atomic_dir(sys.argv[2]) as tmp:
    (tmp / "half-written.bin").write_bytes(b"x" * 4096)
    if sys.argv[3] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    print("writing", flush=True)
    sys.stdin.read()  # a live writer: blocks until stdin closes (or it is killed)
"""


def writer_command(target: str | Path, mode: str) -> list[str]:
    """argv of a child that writes `target` with `atomic_dir`; mode "die" SIGKILLs itself half-way, "live"
    prints `writing` and waits on stdin inside the block."""
    return [sys.executable, "-c", WRITER_SCRIPT, str(Path(atomic.__file__)), str(target), mode]


def killed_atomic_writer(target: str | Path) -> None:
    """Run a child that is SIGKILLed inside `atomic_dir(target)`, leaving its half-written temp beside `target`."""
    r = subprocess.run(writer_command(target, "die"), capture_output=True)
    if r.returncode != -signal.SIGKILL:
        raise RuntimeError(f"writer child did not die as planned (rc {r.returncode}): {r.stderr.decode()[-500:]}")


def dead_pid() -> int:
    """The pid of a child process that has already exited (not reused this soon on Linux)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def killed_file_write(path: str | Path, data: bytes = b"x" * 4096) -> Path:
    """Leave the temp file an `atomic_write_bytes(path, …)` killed before its rename leaves (a dead writer's pid)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.p{dead_pid()}-{atomic._host_tag()}-killed01.tmp")
    tmp.write_bytes(data)
    return tmp
