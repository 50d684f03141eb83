"""The soaes user cache (`SOAES_CACHE`, default `~/.cache/soaes`), a cross-process build lock, and an owner lock
that refuses a second holder and names the first."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .atomic import pid_alive
from .errors import SoaesError


def cache_root() -> Path:
    """Root of the soaes cache: `$SOAES_CACHE`, else `$XDG_CACHE_HOME/soaes`, else `~/.cache/soaes`."""
    env = os.environ.get("SOAES_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "soaes"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if needed), so two processes don't build one entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class LockedError(SoaesError):
    """An owner lock is held by another process; `holder` is what it wrote in the lock file (pid, host, since)."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


_HELD_FDS: set[int] = set()


def _close_held_in_child() -> None:
    # a forked worker must not keep its parent's lock alive after the parent dies
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _read_holder(fd: int) -> dict[str, Any] | None:
    for _ in range(3):  # the holder may be between truncating and writing
        try:
            data = os.pread(fd, 4096, 0)
        except OSError:
            return None
        if data:
            try:
                holder = json.loads(data.decode("utf-8"))
            except ValueError:
                return None
            return holder if isinstance(holder, dict) else None
        time.sleep(0.02)
    return None


def describe_holder(holder: dict[str, Any] | None) -> str:
    """`pid 123 on host, since 2026-…` (or `an unknown process`) for a lock holder record."""
    if not holder:
        return "an unknown process"
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    return text + (f", since {holder['since']}" if holder.get("since") else "")


def _is_local_and_dead(holder: dict[str, Any] | None) -> bool:
    return bool(holder) and holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid"))


def _try_flock(fd: int, path: Path, what: str) -> bool:
    """Take the exclusive lock or raise `LockedError`; False when the filesystem has no file locks."""
    for attempt in range(20):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = _read_holder(fd)
            if not holder and attempt < 19:  # a `lock_holder` probe, or a holder still writing its record
                time.sleep(0.05)
                continue
            extra = (" (that process has exited, but a process it started still holds the lock)"
                     if _is_local_and_dead(holder) else "")
            raise LockedError(f"{what} is in use by {describe_holder(holder)}{extra}; wait for it to finish or "
                              f"stop it (lock file {path})", holder) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            return False  # no file locks here: the caller falls back to the pid in the file
    return False  # unreachable


@contextlib.contextmanager
def owner_lock(path: str | os.PathLike[str], what: str = "this folder") -> Iterator[dict[str, Any] | None]:
    """Hold an exclusive lock on `path` (an OS file lock, released by the OS if the process dies) with this
    process's pid and host written in it; raise `LockedError` naming the holder when another process has it.

    Yields the record of a previous holder that died without releasing it (its lock file is taken over), else
    None. Where the filesystem has no file locks, a lock file naming a live process on this host still refuses."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        flocked = _try_flock(fd, path, what)
        previous = _read_holder(fd)
        if previous and previous.get("pid") == os.getpid() and previous.get("host") == socket.gethostname():
            previous = None  # our own record (a released lock of this process)
        if not flocked and previous and not _is_local_and_dead(previous) and previous.get("host") == \
                socket.gethostname():
            raise LockedError(f"{what} is in use by {describe_holder(previous)}; wait for it to finish or stop it "
                              f"(lock file {path})", previous)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        _HELD_FDS.add(fd)
        try:
            yield previous
        finally:
            _HELD_FDS.discard(fd)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # released: no holder to name
            if flocked:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock_holder(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds the owner lock at `path` (its record), or None when nobody does. Takes no lock for long."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {}
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
