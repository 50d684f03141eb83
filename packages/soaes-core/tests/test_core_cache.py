"""`owner_lock`: one holder at a time, a refusal names the holder in one line, and a record left by a dead
process is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from soaes_core.cache import LockedError, describe_holder, lock_holder, owner_lock
from soaes_core.testing.killed import dead_pid

HOLD = """
import sys
from soaes_core.cache import owner_lock
with owner_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    lock = tmp_path / "run" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert lock_holder(lock)["pid"] == holder.pid
        with pytest.raises(LockedError) as err, owner_lock(lock, what="run folder X"):
            pass
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"run folder X is in use by pid {holder.pid} on {socket.gethostname()}, since ")
        assert err.value.holder["pid"] == holder.pid
    finally:
        holder.communicate("")  # closes stdin: the holder releases and exits
    assert holder.returncode == 0 and lock_holder(lock) is None
    with owner_lock(lock) as previous:
        assert previous is None  # released cleanly: nothing to take over


def test_record_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00"}
    lock.write_text(json.dumps(stale))
    assert lock_holder(lock) is None  # a record, but no lock
    with owner_lock(lock) as previous:
        assert previous == stale
        assert lock_holder(lock)["pid"] == os.getpid()
    assert describe_holder(stale) == f"pid {stale['pid']} on {stale['host']}, since {stale['since']}"
    assert describe_holder(None) == "an unknown process"
