"""Atomic file and directory writes: readers never see a half-written output, a killed writer leaves the old one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A temp entry is named `.<target>.p<pid>-<host>-<random>.tmp`, so the next run can tell a live writer's temp from
# one a killed process left behind. Temps of another host (shared filesystem) or of the pre-tag naming
# (`.<target>.<random>.tmp`) are judged by age alone.
STALE_TEMP_AGE_S = 24 * 3600.0
LEGACY_TEMP_AGE_S = 3600.0
_TAGGED = re.compile(r"^\.(?P<target>.+)\.p(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[a-z0-9_]+\.tmp$")
_LEGACY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(name: str) -> str:
    return f".{name}.p{os.getpid()}-{_host_tag()}-"


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temp name beside `path` (`.<name>.p<pid>-<host>-<random>.tmp`), for writers that rename into
    place themselves: a temp a kill leaves under this name is one `remove_stale_temps` can clean up."""
    path = Path(path)
    return path.with_name(f"{_temp_prefix(path.name)}{secrets.token_hex(4)}.tmp")


def pid_alive(pid: Any) -> bool:
    """Whether process `pid` exists on this host (also when another user owns it); False for a non-pid."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _is_stale(entry: Path, now: float, max_age_s: float) -> bool:
    try:
        age = now - entry.lstat().st_mtime
    except FileNotFoundError:
        return False
    m = _TAGGED.match(entry.name)
    if m is not None:
        if int(m["pid"]) == os.getpid() and m["host"] == _host_tag():
            return False  # ours (e.g. a nested writer in this process)
        if m["host"] == _host_tag() and not pid_alive(int(m["pid"])):
            return True
        return age > max_age_s  # a live pid may have been reused; another host's pid cannot be checked
    return _LEGACY.match(entry.name) is not None and age > min(max_age_s, LEGACY_TEMP_AGE_S)


def remove_stale_temps(directory: str | os.PathLike[str], target: str | None = None,
                       max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Delete the temp files/dirs that killed writers left in `directory` (only those of `target` if given).

    A temp is stale when its writer (pid in the name, same host) is dead, or it is older than `max_age_s`;
    a live writer's temp is never touched. Returns what was removed.
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for e in entries:
        if not (e.name.startswith(".") and e.name.endswith(".tmp")):
            continue
        if target is not None and not e.name.startswith(f".{target}."):
            continue
        m = _TAGGED.match(e.name) or _LEGACY.match(e.name)
        if m is None or (target is not None and m["target"] != target):
            continue
        path = Path(e.path)
        if not _is_stale(path, now, max_age_s):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if not path.exists():
            removed.append(path)
    return removed


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (else by the set-and-restore idiom)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_if_created(path: str | os.PathLike[str], directory: bool) -> None:
    """Give a mkstemp/mkdtemp entry (0600/0700) the mode an ordinary create would: 0666/0777 less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same directory and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        _as_if_created(tmp, directory=False)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Atomically write a text file."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Atomically write `obj` as pretty, UTF-8 (non-ASCII kept) JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path`, on error it is removed.

    The old directory (if any) is moved aside first and deleted only after the new one is in place, so a
    kill at any point leaves either the old or the new complete directory under `path` (or the old one
    under its `.old` name, which the next call cleans up). Temps of `path` left by killed writers are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.replace(old, path)  # a previous swap was interrupted between the two renames
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temps(path.parent, target=path.name)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent))
    try:
        _as_if_created(tmp, directory=True)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def replace_dir(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Swap the finished directory `tmp` into place at `path`: the old `path` is moved aside to `.NAME.old` first
    and deleted only after the rename, so a kill leaves the old or the new complete directory."""
    tmp, path = Path(tmp), Path(path)
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
