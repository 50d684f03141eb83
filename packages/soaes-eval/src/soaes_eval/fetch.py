"""Download the public CMMLU / C-Eval release archives once, verify them, and unpack them into the soaes cache.

`fetch_benchmark("cmmlu")` puts the release in ``$SOAES_CACHE/benchmarks/cmmlu/`` (``test/``, ``dev/``), where the
``soaes_cmmlu`` / ``soaes_ceval`` tasks and soaes-data's decontamination find it without options. No official
checksum of either archive is built in, so unless ``sha256`` is given the first download's sha256 is recorded in
``$SOAES_CACHE/benchmarks/pins.json`` and every later download of that URL must match it (trust on first use).
The archive is downloaded to a ``.part`` file (resumed with an HTTP range request after an interruption) within
one time limit, verified (length when the server sends one, zip structure and member CRCs, sha256 when known) and
only then moved into the download cache; an archive found there is verified the same way before use and fetched
again when broken. It is unpacked with no path outside the target, no member name twice and bounded sizes, checked
for the release layout, and moved into place in one rename; a complete copy is reused.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from soaes_core import atomic_write_json, cache_root
from soaes_core.cache import file_lock
from soaes_core.errors import ConfigError, IntegrityError, SoaesError

log = logging.getLogger(__name__)

MARKER = "soaes_fetch.json"  # written last into a complete copy; soaes_data.decontam.FETCH_MARKER reads it
PINS_FILE = "pins.json"
MAX_DOWNLOAD_BYTES = 1 << 30  # the real archives are under 5 MB
MAX_UNPACKED_BYTES = 2 << 30  # the real archives unpack to under 20 MB: anything near this is not a release
MAX_MEMBERS = 20_000
MAX_RATIO = 1000  # per-member uncompressed/compressed bound (CSV text compresses ~5-10x)
CHUNK = 1 << 20
DEFAULT_TIMEOUT_S = 300.0  # the whole download: the real archives take seconds on any working connection


class FetchError(SoaesError):
    """A benchmark archive could not be downloaded or is not the expected release."""


@dataclass(frozen=True)
class Release:
    """A public benchmark release: where its zip is, and the `<split>/<file>.csv` layout its tasks read."""

    name: str
    url: str
    required_splits: tuple[str, ...]  # each must hold at least one subject CSV
    splits: tuple[str, ...]  # every split folder the release ships
    sha256: str | None = None  # none published upstream: pinned on first download instead
    split_suffix: bool = False  # C-Eval names files <subject>_<split>.csv, CMMLU <subject>.csv

    def subject_of(self, split: str, filename: str) -> str | None:
        """Subject of `<split>/<filename>`, or None when the file is not a subject CSV of this layout."""
        suffix = f"_{split}.csv" if self.split_suffix else ".csv"
        return filename[: -len(suffix)] if filename.endswith(suffix) and len(filename) > len(suffix) else None


RELEASES = {
    "cmmlu": Release("cmmlu", "https://huggingface.co/datasets/haonan-li/cmmlu/resolve/main/cmmlu_v1_0_1.zip",
                     required_splits=("test", "dev"), splits=("test", "dev")),
    "ceval": Release("ceval", "https://huggingface.co/datasets/ceval/ceval-exam/resolve/main/ceval-exam.zip",
                     required_splits=("val", "dev"), splits=("dev", "val", "test"), split_suffix=True),
}


@dataclass(frozen=True)
class FetchResult:
    """What `fetch_benchmark` did: the folder, the archive's sha256 and where its expected value came from."""

    name: str
    dir: Path
    url: str
    sha256: str
    checksum: str  # "given" | "pinned" (matched an earlier download) | "recorded" (first download, now pinned)
    reused: bool  # the folder was already complete: nothing downloaded or unpacked
    subjects: dict[str, int]  # split -> number of subject files

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dir": str(self.dir), "url": self.url, "sha256": self.sha256,
                "checksum": self.checksum, "reused": self.reused, "subjects": self.subjects}


def benchmarks_root() -> Path:
    """`$SOAES_CACHE/benchmarks`: fetched releases, their downloads and the checksum pins."""
    return cache_root() / "benchmarks"


def fetched_dir(name: str) -> Path | None:
    """The complete fetched copy of benchmark `name` in the cache, or None."""
    path = benchmarks_root() / name
    return path if (path / MARKER).is_file() else None


def release(name: str) -> Release:
    try:
        return RELEASES[name]
    except KeyError:
        raise ConfigError(f"unknown benchmark {name!r}; fetchable: {', '.join(RELEASES)}") from None


def check_sha256(value: str) -> str:
    """A sha256 hex digest, lower-cased, or a ConfigError."""
    v = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", v):
        raise ConfigError(f"--sha256 must be 64 hex digits, got {value!r}")
    return v


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _to_url(url: str) -> str:
    """A local path becomes a file:// URL (an archive copied by hand onto an offline machine)."""
    if "://" not in url and Path(url).expanduser().exists():
        return Path(url).expanduser().resolve().as_uri()
    if urllib.parse.urlparse(url).scheme not in ("http", "https", "file"):
        raise ConfigError(f"--url must be an http(s):// or file:// URL or an existing file, got {url!r}")
    return url


def _socket_of(resp: Any) -> socket.socket | None:
    """The socket under an http(s) response (None for file:// URLs), to bound each read by the time left."""
    sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _looks_like_html(head: bytes, content_type: str) -> bool:
    start = head.lstrip().lower()
    return "html" in content_type.lower() or start.startswith((b"<!doctype", b"<html", b"<head", b"<body", b"<?xml"))


def archive_problem(path: Path) -> str | None:
    """Why `path` is not a whole, readable zip archive (no central directory, a member failing its CRC, an unsafe
    member or size), or None when it is one."""
    try:
        with path.open("rb") as fh:
            head = fh.read(512)
        if not head.startswith(b"PK"):
            return "an HTML page, not a zip archive" if _looks_like_html(head, "") else \
                f"not a zip archive (starts with {head[:8]!r})"
        with zipfile.ZipFile(path) as zf:
            for info, _ in _safe_members(zf, path):
                with zf.open(info) as member:
                    while member.read(CHUNK):  # zipfile checks the CRC at the end of each member
                        pass
    except FetchError as err:
        return str(err).removeprefix(f"{path}: ")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as err:
        return f"incomplete or damaged zip archive ({err})"
    return None


def download(url: str, dest: Path, timeout: float = DEFAULT_TIMEOUT_S, sha256: str | None = None) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming a partial `.part` with a range request. `timeout`
    bounds the whole transfer. `dest` appears only once the file is verified: its length matches Content-Length
    when the server sends one, it is a whole zip archive, and its sha256 is `sha256` when that is given; an HTML
    page, a cut-off body or a checksum mismatch is an error and leaves no `dest`."""
    deadline = time.monotonic() + timeout
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "soaes-eval-fetch"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the range starts at or past the end: start over
            part.unlink()
            return download(url, dest, max(deadline - time.monotonic(), 0.001), sha256)
        raise FetchError(f"download failed: {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise FetchError(f"download failed: {url}: {getattr(err, 'reason', err)}") from None
    timed_out = FetchError(f"download timed out: {url}: not finished within --timeout {timeout:g} s; run the "
                           f"command again to resume, or raise --timeout")
    with resp:
        content_type = resp.headers.get("Content-Type", "") or ""
        if "html" in content_type.lower():  # a login, consent or error page: refuse before reading it
            raise FetchError(f"download failed: {url}: got an HTML page ({content_type}), not a zip archive (a "
                             f"login or error page?); check --url")
        resumed = have and getattr(resp, "status", 200) == 206
        length = resp.headers.get("Content-Length")
        expected = (have if resumed else 0) + int(length) if length and length.isdigit() else None
        read = getattr(resp, "read1", resp.read)  # one socket read at a time, so the deadline is checked often
        sock = _socket_of(resp)
        too_large = False
        try:
            with part.open("ab" if resumed else "wb") as fh:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise timed_out
                    if sock is not None:
                        with contextlib.suppress(OSError):  # closed once the body is read: nothing left to bound
                            sock.settimeout(left)
                    block = read(CHUNK)
                    if not block:
                        break
                    fh.write(block)
                    if fh.tell() > MAX_DOWNLOAD_BYTES:
                        too_large = True
                        break
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # the .part stays: resume it
            if time.monotonic() >= deadline:
                raise timed_out from None
            raise FetchError(f"download interrupted: {url}: {err}; run the command again to resume") from None
    if too_large:
        part.unlink()
        raise FetchError(f"download too large: {url}: over {MAX_DOWNLOAD_BYTES} bytes, not a benchmark release")
    got = part.stat().st_size
    if expected is not None and got != expected:
        raise FetchError(f"download incomplete: {url}: {got} of {expected} bytes; run the command again to resume")
    problem = archive_problem(part)
    if problem is not None:
        with part.open("rb") as fh:
            head = fh.read(512)
        part.unlink()  # no resume: a body cut off without a length, or not an archive at all
        if _looks_like_html(head, content_type):
            raise FetchError(f"download failed: {url}: got an HTML page, not a zip archive (a login or error "
                             f"page?); check --url")
        if head.startswith(b"PK") and expected is None:
            raise FetchError(f"download incomplete: {url}: {got} bytes, no Content-Length and not a whole zip "
                             f"archive (the connection closed early?); run the command again")
        raise FetchError(f"download failed: {url}: {problem}")
    if sha256 is not None:
        digest = file_sha256(part)
        if digest != sha256:
            part.unlink()  # a retry downloads it again
            raise IntegrityError(f"sha256 mismatch for {url}: expected {sha256}, got {digest}; download deleted "
                                 f"(pass --sha256 for a new release)")
    os.replace(part, dest)
    return dest


def _safe_members(zf: zipfile.ZipFile, archive: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Regular-file members with their relative paths; refuses traversal, links, encryption, zip bombs and a
    file stored twice (which copy wins would depend on the unpacker, so the archive is ambiguous)."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise FetchError(f"{archive}: {len(infos)} members (more than {MAX_MEMBERS}): not a benchmark release")
    total = 0
    out = []
    seen: dict[str, str] = {}  # case-folded normalised path -> first member name (one file on macOS/Windows too)
    for info in infos:
        name = info.filename
        rel = PurePosixPath(name)
        if (name.startswith(("/", "\\")) or "\\" in name or re.match(r"^[A-Za-z]:", name)
                or any(p in ("..", "") for p in rel.parts) or "\x00" in name):
            raise FetchError(f"{archive}: unsafe member path {name!r}")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise FetchError(f"{archive}: member {name!r} is a symbolic link")
        if info.flag_bits & 0x1:
            raise FetchError(f"{archive}: member {name!r} is encrypted")
        if info.is_dir() or rel.parts[0] == "__MACOSX" or rel.name == ".DS_Store":
            continue  # folders are made as needed; macOS resource forks are not data
        key = rel.as_posix().casefold()
        if key in seen:
            first = seen[key]
            same = f"{name!r} twice" if first == name else f"{first!r} and {name!r} (the same file)"
            raise FetchError(f"{archive}: member {same}: refusing an ambiguous archive")
        seen[key] = name
        total += info.file_size
        if total > MAX_UNPACKED_BYTES:
            raise FetchError(f"{archive}: unpacks to more than {MAX_UNPACKED_BYTES} bytes: not a benchmark release")
        if info.file_size > MAX_RATIO * max(info.compress_size, 1) + CHUNK:
            raise FetchError(f"{archive}: member {name!r} compresses {info.file_size}:{info.compress_size}: "
                             f"refusing a likely zip bomb")
        out.append((info, rel))
    return out


def _release_root(rels: list[PurePosixPath], rel: Release) -> tuple[str, ...]:
    """Path parts of the folder inside the archive that holds the split folders (the top, or one wrapping folder)."""
    for depth in (0, 1):
        roots = {r.parts[:depth] for r in rels if len(r.parts) == depth + 2 and r.parts[depth] in rel.required_splits}
        if len(roots) == 1:
            return roots.pop()
    raise FetchError(f"not a {rel.name} release: no {'/ and '.join(rel.required_splits)}/ folders of CSV files")


def unpack(archive: Path, target: Path, rel: Release) -> dict[str, int]:
    """Unpack the release's subject CSVs from `archive` into the new folder `target`; returns files per split.
    Anything else in the archive (READMEs, scripts) is not needed by the tasks and is left in the archive."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise FetchError(f"{archive}: not a zip archive ({err})") from None
    with zf:
        members = _safe_members(zf, archive)
        root = _release_root([r for _, r in members], rel)
        counts = {split: 0 for split in rel.splits}
        target.mkdir(parents=True)
        for info, path in members:
            inner = path.parts[len(root):]
            if path.parts[:len(root)] != root or len(inner) != 2 or inner[0] not in rel.splits:
                continue
            split, filename = inner
            if rel.subject_of(split, filename) is None:
                continue
            out = target / split / filename
            out.parent.mkdir(exist_ok=True)
            written = 0
            try:
                with zf.open(info) as src, out.open("wb") as dst:
                    for block in iter(lambda src=src: src.read(CHUNK), b""):
                        written += len(block)
                        if written > info.file_size:  # the header understated the size
                            raise FetchError(f"{archive}: member {info.filename!r} is larger than its header says")
                        dst.write(block)
            except (zipfile.BadZipFile, EOFError) as err:  # a CRC or stream error: the archive is damaged
                raise FetchError(f"{archive}: member {info.filename!r} is damaged ({err})") from None
            counts[split] += 1
    missing = [s for s in rel.required_splits if not counts[s]]
    if missing:
        raise FetchError(f"not a {rel.name} release: no subject CSVs in {', '.join(missing)}/")
    return counts


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _pin(root: Path, url: str, digest: str) -> None:
    """Record `digest` for `url` in the pins file (read again under its own lock: other benchmarks write it too)."""
    with file_lock(root / ".pins.lock"):
        pins = _read_json(root / PINS_FILE)
        pins[url] = digest
        atomic_write_json(root / PINS_FILE, pins)


def fetch_benchmark(name: str, dest: str | os.PathLike[str] | None = None, url: str | None = None,
                    sha256: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> FetchResult:
    """Download, verify and unpack benchmark `name` ('cmmlu' | 'ceval') into `dest` (default the cache, where the
    tasks find it) with `timeout` seconds for the whole download; reuses a complete copy of the same archive, and
    a cached archive only after verifying it (a broken one, e.g. left by an older soaes, is downloaded again)."""
    rel = release(name)
    if not timeout > 0:
        raise ConfigError(f"--timeout must be a number of seconds > 0, got {timeout}")
    url = _to_url(url or rel.url)
    given = check_sha256(sha256) if sha256 else None
    root = benchmarks_root()
    target = Path(dest).expanduser().resolve() if dest else root / name
    with file_lock(root / f".{name}.lock"):
        pins = _read_json(root / PINS_FILE)
        expected = given or rel.sha256 or pins.get(url)
        source = "given" if given else ("pinned" if expected else "recorded")
        marker = _read_json(target / MARKER)
        if marker.get("url") == url and (expected is None or marker.get("sha256") == expected):
            return FetchResult(name, target, url, marker["sha256"], source, True, marker.get("subjects", {}))
        if target.exists() and not marker and any(target.iterdir()):
            raise FetchError(f"{target} exists and is not a folder made by `soaes-eval fetch`; pick another --dest")
        if marker and marker.get("benchmark") != name:
            raise FetchError(f"{target} holds {marker.get('benchmark')!r}, not {name!r}; pick another --dest")

        key = hashlib.sha256(url.encode()).hexdigest()[:12]
        archive = root / "downloads" / f"{name}-{key}-{Path(urllib.parse.urlparse(url).path).name or 'archive'}"
        if archive.exists():
            problem = archive_problem(archive)
            if problem is None and expected and file_sha256(archive) != expected:
                problem = "its sha256 is not the expected one"
            if problem is not None:
                log.warning("%s: cached archive is unusable (%s); downloading it again", archive, problem)
                archive.unlink()
        if not archive.exists():
            download(url, archive, timeout, expected)
        digest = file_sha256(archive)

        staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
        # unpacked copies that killed runs left (any pid: we hold the lock, so none is being written)
        for leftover in target.parent.glob(f".{glob.escape(target.name)}.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            try:
                counts = unpack(archive, staging, rel)
            except FetchError:
                archive.unlink(missing_ok=True)  # not this release: never keep it as the cached download
                raise
            atomic_write_json(staging / MARKER, {"benchmark": name, "url": url, "sha256": digest,
                                                 "checksum": source, "subjects": counts, "archive": str(archive)})
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if target.exists():
                os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if pins.get(url) != digest:  # first download, or a checksum given for a new release: pin it
            _pin(root, url, digest)
    return FetchResult(name, target, url, digest, source, False, counts)
