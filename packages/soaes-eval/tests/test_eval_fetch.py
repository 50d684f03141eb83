"""`soaes-eval fetch`: archives in the real release layouts served on 127.0.0.1, checksums, safe unpacking,
resumed downloads, and the tasks / decontamination finding the fetched data with no manual step."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import random
import stat
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from soaes_core.errors import ConfigError, IntegrityError
from soaes_eval import fetch as fetch_mod
from soaes_eval.cli import main
from soaes_eval.fetch import RELEASES, FetchError, fetch_benchmark, unpack
from soaes_eval.tasks import TASKS_DIR
from soaes_eval.tasks.loaders import load_ceval_subject, resolve_data_dir

CMMLU_SUBJECTS = sorted(p.stem.removeprefix("soaes_cmmlu_") for p in (TASKS_DIR / "cmmlu").glob("soaes_cmmlu_*.yaml"))
CEVAL_SUBJECTS = sorted(p.stem.removeprefix("soaes_ceval_") for p in (TASKS_DIR / "ceval").glob("soaes_ceval_*.yaml"))
PER_SUBJECT = 2  # test questions per CMMLU subject (the shipped samples have 1)


HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后"


def _question(subject: str, k: int) -> str:
    """A question no other subject shares a 13-character run with (seeded by subject and number)."""
    rng = random.Random(f"{subject}/{k}")
    return "".join(rng.choice(HANZI) for _ in range(30)) + "？"


def _cmmlu_files(per_subject: int = PER_SUBJECT) -> dict[str, str]:
    files = {}
    for s in CMMLU_SUBJECTS:
        rows = [f"{k},{_question(s, k)},选项一,选项二,选项三,选项四,{'ABCD'[k % 4]}" for k in range(per_subject)]
        files[f"test/{s}.csv"] = ",Question,A,B,C,D,Answer\n" + "\n".join(rows) + "\n"
        files[f"dev/{s}.csv"] = f",Question,A,B,C,D,Answer\n0,{s}示例题？,甲,乙,丙,丁,A\n"
    return files


def _ceval_files(subjects: list[str] = CEVAL_SUBJECTS, per_subject: int = 3) -> dict[str, str]:
    files = {}
    head = "id,question,A,B,C,D,answer,explanation\n"
    for s in subjects:
        files[f"dev/{s}_dev.csv"] = head + f"0,{s}示例题？,甲,乙,丙,丁,A,因为甲\n"
        files[f"val/{s}_val.csv"] = head + "".join(
            f"{k},{_question(s, k)},甲,乙,丙,丁,{'ABCD'[k % 4]},\n" for k in range(per_subject))
        files[f"test/{s}_test.csv"] = "id,question,A,B,C,D\n" + f"0,{s}无答案的测试题？,甲,乙,丙,丁\n"
    return files


def _zip(files: dict[str, str], prefix: str = "", extra: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in {**files, **(extra or {})}.items():
            zf.writestr(prefix + name, text.encode("utf-8"))
    return buf.getvalue()


class _Server:
    """An HTTP server on 127.0.0.1 serving in-memory files, with byte ranges; `cut` truncates the next response.
    `modes[path]` misbehaves: "close-early" (half the body, no Content-Length, then close), "html" (200 with an
    HTML page), "trickle" (one byte every `TRICKLE_S`, giving up after `TRICKLE_LIMIT_S`)."""

    TRICKLE_S = 0.25
    TRICKLE_LIMIT_S = 4.0

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.requests: list[dict[str, str]] = []
        self.cut: int | None = None
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append({"path": self.path, "range": self.headers.get("Range", "")})
                body = outer.files.get(self.path)
                mode = outer.modes.get(self.path)
                if mode == "html":
                    page = b"<!DOCTYPE html><html><body>Please log in to continue.</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                if body is None:
                    self.send_error(404)
                    return
                if mode == "close-early":  # HTTP/1.0 without Content-Length: the close ends the body
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    return
                if mode == "trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    stop = time.monotonic() + outer.TRICKLE_LIMIT_S
                    try:
                        for byte in body:
                            if time.monotonic() > stop:
                                return
                            self.wfile.write(bytes([byte]))
                            time.sleep(outer.TRICKLE_S)
                    except OSError:  # the client gave up
                        return
                    return
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if outer.cut is not None:  # send part of the body, then drop the connection
                    payload, outer.cut = payload[:outer.cut], None
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private soaes cache, and no data-directory variables that would win over the fetched copy."""
    for var in ("SOAES_CMMLU_DIR", "SOAES_CEVAL_DIR", "SOAES_EVAL_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SOAES_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_fetch_then_run_cmmlu_with_no_manual_step(server: _Server, cache: Path, tiny_qwen2_dir: Path,
                                                   tmp_path: Path) -> None:
    server.files["/cmmlu_v1_0_1.zip"] = _zip(_cmmlu_files())
    url = server.url("/cmmlu_v1_0_1.zip")
    result = _invoke("fetch", "cmmlu", "--url", url)
    assert result.exit_code == 0, result.output
    target = cache / "benchmarks" / "cmmlu"
    assert f"cmmlu: fetched in {target} (test=67, dev=67 subject files)" in result.output
    digest = hashlib.sha256(server.files["/cmmlu_v1_0_1.zip"]).hexdigest()
    assert f"sha256 {digest} (recorded)" in result.output  # no official checksum: pinned on first download
    assert json.loads((cache / "benchmarks" / "pins.json").read_text())[url] == digest
    assert (target / "test" / "agronomy.csv").read_text(encoding="utf-8").count("\n") == PER_SUBJECT + 1
    assert not [p for p in target.parent.iterdir() if ".partial" in p.name or ".old" in p.name]

    again = _invoke("fetch", "cmmlu", "--url", url)  # idempotent: nothing downloaded again
    assert again.exit_code == 0 and "already present" in again.output and len(server.requests) == 1

    out = tmp_path / "out"
    run = _invoke("run", "--model", str(tiny_qwen2_dir), "--tasks", "soaes_cmmlu", "--batch-size", "32",
                  "-o", str(out))
    assert run.exit_code == 0, run.output + repr(run.exception)
    n = len(CMMLU_SUBJECTS) * PER_SUBJECT
    assert f"soaes_cmmlu: n={n} " in run.output  # the fetched questions, not the 67 shipped samples
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["soaes"]["num_items_available"]["soaes_cmmlu"] == n
    assert res["soaes"]["num_items"]["soaes_cmmlu_agronomy"] == PER_SUBJECT

    # soaes-data's decontamination finds the same copy by itself and reports overlaps per subject
    decontam = pytest.importorskip("soaes_data.decontam")
    assert decontam.FETCH_MARKER == fetch_mod.MARKER
    assert decontam.fetched_benchmark_dirs() == {"cmmlu": target}
    cfg = decontam.DecontamConfig()
    index = decontam.NgramIndex.from_config(cfg)
    assert index.describe()["cmmlu"]["agronomy"] == PER_SUBJECT + 1
    report = decontam.OverlapReport(index.describe())
    docs = {"leak": "网页摘录：" + _question("virology", 1) + "答案见下文。", "clean": "与考试无关的一段园艺文字。"}
    for rid, text in docs.items():
        report.add(rid, index.overlaps(text))
    d = report.to_dict()
    assert d["records_contaminated"] == 1 and set(d["benchmarks"]["cmmlu"]["subjects"]) == {"virology"}
    assert d["benchmarks"]["cmmlu"]["subjects"]["virology"]["examples"][0]["record"] == "leak"


def test_sha256_mismatch_is_refused_with_one_line(server: _Server, cache: Path) -> None:
    server.files["/ceval-exam.zip"] = _zip(_ceval_files())
    url = server.url("/ceval-exam.zip")
    result = _invoke("fetch", "ceval", "--url", url, "--sha256", "0" * 64)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sha256 mismatch for " + url)
    assert not (cache / "benchmarks" / "ceval").exists() and not list((cache / "benchmarks" / "downloads").iterdir())

    assert _invoke("fetch", "ceval", "--url", url).exit_code == 0  # first download: recorded
    # the same URL now serves other bytes (a machine with the pins but no download): refused against the pin
    server.files["/ceval-exam.zip"] = _zip(_ceval_files(per_subject=4))
    for f in (cache / "benchmarks" / "downloads").iterdir():
        f.unlink()
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        fetch_benchmark("ceval", dest=cache / "elsewhere", url=url)
    assert len(load_ceval_subject("law")["val"]) == 3 and not (cache / "elsewhere").exists()

    bad = _invoke("fetch", "ceval", "--url", url, "--sha256", "xyz")
    assert bad.exit_code == 2 and "--sha256 must be 64 hex digits" in bad.output


def test_ceval_given_checksum_wrapped_folder_and_dest(server: _Server, cache: Path, tmp_path: Path) -> None:
    data = _zip(_ceval_files(), prefix="ceval-exam/", extra={"README.md": "not data"})
    server.files["/c.zip"] = data
    dest = tmp_path / "mine" / "ceval"
    res = fetch_benchmark("ceval", dest=dest, url=server.url("/c.zip"), sha256=hashlib.sha256(data).hexdigest())
    assert res.checksum == "given" and not res.reused and res.dir == dest
    assert res.subjects == {"dev": 52, "val": 52, "test": 52}
    assert sorted(p.name for p in dest.iterdir()) == ["dev", "soaes_fetch.json", "test", "val"]
    assert len(load_ceval_subject("law", ceval_dir=str(dest))["val"]) == 3
    with pytest.raises(ConfigError, match="soaes-eval fetch ceval"):  # --dest is not the cache: pass it explicitly
        resolve_data_dir("ceval", {})

    # a newer archive (given checksum) replaces the copy in one rename
    newer = _zip(_ceval_files(per_subject=5))
    server.files["/c2.zip"] = newer
    res2 = fetch_benchmark("ceval", dest=dest, url=server.url("/c2.zip"), sha256=hashlib.sha256(newer).hexdigest())
    assert not res2.reused and len(load_ceval_subject("law", ceval_dir=str(dest))["val"]) == 5

    with pytest.raises(FetchError, match="holds 'ceval', not 'cmmlu'"):
        fetch_benchmark("cmmlu", dest=dest, url=server.url("/c.zip"))
    foreign = tmp_path / "foreign"
    (foreign / "x").mkdir(parents=True)
    with pytest.raises(FetchError, match="not a folder made by `soaes-eval fetch`"):
        fetch_benchmark("ceval", dest=foreign, url=server.url("/c.zip"))

    local = tmp_path / "copied.zip"  # an archive carried onto an offline machine
    local.write_bytes(data)
    res3 = fetch_benchmark("ceval", url=str(local))
    assert res3.dir == cache / "benchmarks" / "ceval" and resolve_data_dir("ceval", {}) == res3.dir


def test_interrupted_download_resumes_with_a_range_request(server: _Server, cache: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data = _zip(_cmmlu_files(per_subject=1))
    server.files["/cmmlu.zip"] = data
    server.cut = len(data) // 2
    with pytest.raises(FetchError, match="run the command again to resume"):
        fetch_benchmark("cmmlu", url=server.url("/cmmlu.zip"))
    parts = list((cache / "benchmarks" / "downloads").glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == len(data) // 2
    assert not (cache / "benchmarks" / "cmmlu").exists()
    res = fetch_benchmark("cmmlu", url=server.url("/cmmlu.zip"))
    assert server.requests[-1]["range"] == f"bytes={len(data) // 2}-"
    assert res.sha256 == hashlib.sha256(data).hexdigest() and res.subjects == {"test": 67, "dev": 67}

    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_benchmark("ceval", url=server.url("/missing.zip"))
    server.files["/big.zip"] = b"x" * 5000
    monkeypatch.setattr(fetch_mod, "MAX_DOWNLOAD_BYTES", 4096)
    monkeypatch.setattr(fetch_mod, "CHUNK", 1024)
    with pytest.raises(FetchError, match="download too large"):
        fetch_benchmark("ceval", url=server.url("/big.zip"))
    assert not list((cache / "benchmarks" / "downloads").glob("ceval-*"))


def _raw_zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, body in entries:
            zf.writestr(info, body)
    return buf.getvalue()


@pytest.mark.parametrize(("entries", "message"), [
    ([("test/a.csv", b"x"), ("../evil.csv", b"x")], "unsafe member path '../evil.csv'"),
    ([("test/a.csv", b"x"), ("/etc/evil.csv", b"x")], "unsafe member path '/etc/evil.csv'"),
    ([("test/a.csv", b"x"), ("dev\\..\\..\\evil.csv", b"x")], "unsafe member path"),
    ([("data/a.csv", b"x")], "not a cmmlu release: no test/ and dev/ folders"),
    ([("dev/a.csv", b"x")], "no subject CSVs in test/"),
    ([("test/a.csv", b"x"), ("dev/notes.txt", b"x")], "no subject CSVs in dev/"),
])
def test_unsafe_or_wrong_archives_are_refused(tmp_path: Path, entries: list[Any], message: str) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_raw_zip(entries))
    with pytest.raises(FetchError, match=message.replace("\\", "\\\\").replace("(", r"\(")):
        unpack(archive, tmp_path / "out", RELEASES["cmmlu"])
    assert not (tmp_path / "evil.csv").exists() and not Path("/etc/evil.csv").exists()


def test_links_bombs_and_non_zips_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link = zipfile.ZipInfo("test/a.csv")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = tmp_path / "link.zip"
    archive.write_bytes(_raw_zip([(link, b"/etc/passwd"), ("dev/a.csv", b"x")]))
    with pytest.raises(FetchError, match="symbolic link"):
        unpack(archive, tmp_path / "o1", RELEASES["cmmlu"])

    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(_raw_zip([("test/a.csv", b"\0" * (4 << 20)), ("dev/a.csv", b"x")]))
    monkeypatch.setattr(fetch_mod, "MAX_RATIO", 10)
    with pytest.raises(FetchError, match="likely zip bomb"):
        unpack(bomb, tmp_path / "o2", RELEASES["cmmlu"])
    monkeypatch.setattr(fetch_mod, "MAX_RATIO", 10_000)
    monkeypatch.setattr(fetch_mod, "MAX_UNPACKED_BYTES", 1 << 20)
    with pytest.raises(FetchError, match="unpacks to more than"):
        unpack(bomb, tmp_path / "o3", RELEASES["cmmlu"])
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3"))

    text = tmp_path / "page.zip"
    text.write_text("<html>not found</html>", encoding="utf-8")
    with pytest.raises(FetchError, match="not a zip archive"):
        unpack(text, tmp_path / "o4", RELEASES["cmmlu"])
    result = _invoke("fetch", "cmmlu", "--url", "ftp://example.org/x.zip")
    assert result.exit_code == 2 and "--url must be an http(s)://" in result.output


def test_unpacked_copies_left_by_killed_runs_are_removed(server: _Server, cache: Path, tmp_path: Path) -> None:
    """Issue 15, defect 9: a fetch killed while unpacking leaves `.NAME.partial-PID`; the next fetch removes it."""
    data = _zip(_ceval_files(per_subject=1))
    server.files["/c.zip"] = data
    dest = tmp_path / "bench" / "ceval"
    leftover = dest.with_name(".ceval.partial-999999999")  # a killed run's half-unpacked copy
    (leftover / "val").mkdir(parents=True)
    (leftover / "val" / "law_val.csv").write_text("half")
    fetch_benchmark("ceval", dest=dest, url=server.url("/c.zip"))
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ceval"]


def _archive_path(cache: Path, name: str, url: str) -> Path:
    """Where `fetch_benchmark` keeps the downloaded archive of `url`."""
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    return cache / "benchmarks" / "downloads" / f"{name}-{key}-{url.rsplit('/', 1)[1]}"


def _one_error_line(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_early_close_without_length_is_an_error_never_a_cached_archive(server: _Server, cache: Path) -> None:
    """Issue 29, item 6: a body cut short with no Content-Length looked complete and was cached as the archive."""
    data = _zip(_cmmlu_files(per_subject=1))
    server.files["/cmmlu.zip"] = data
    server.modes["/cmmlu.zip"] = "close-early"
    url = server.url("/cmmlu.zip")
    line = _one_error_line(_invoke("fetch", "cmmlu", "--url", url))
    assert "download incomplete" in line and url in line
    assert not _archive_path(cache, "cmmlu", url).exists() and not (cache / "benchmarks" / "cmmlu").exists()
    del server.modes["/cmmlu.zip"]  # the server recovers: the next run downloads and unpacks it
    again = _invoke("fetch", "cmmlu", "--url", url)
    assert again.exit_code == 0, again.output
    assert "test=67, dev=67" in again.output and not list((cache / "benchmarks" / "downloads").glob("*.part"))


def test_html_answer_is_an_error_never_a_cached_archive(server: _Server, cache: Path) -> None:
    """Issue 29, item 6: a 200 answer with an HTML page (a login or error page) was cached as the archive."""
    server.files["/ceval-exam.zip"] = _zip(_ceval_files(per_subject=1))
    server.modes["/ceval-exam.zip"] = "html"
    url = server.url("/ceval-exam.zip")
    line = _one_error_line(_invoke("fetch", "ceval", "--url", url))
    assert "HTML page" in line and "not a zip archive" in line and url in line
    assert not list((cache / "benchmarks" / "downloads").iterdir())
    assert not (cache / "benchmarks" / "pins.json").exists()  # nothing pinned from a page
    del server.modes["/ceval-exam.zip"]
    assert _invoke("fetch", "ceval", "--url", url).exit_code == 0


@pytest.mark.parametrize("broken", [b"<html><body>Service unavailable</body></html>", "truncated"])
def test_broken_archive_cached_by_an_older_version_is_fetched_again(server: _Server, cache: Path,
                                                                    broken: bytes | str) -> None:
    """Issue 29, item 6: a broken archive already in the download cache failed every later run."""
    data = _zip(_cmmlu_files(per_subject=1))
    server.files["/cmmlu.zip"] = data
    url = server.url("/cmmlu.zip")
    archive = _archive_path(cache, "cmmlu", url)
    archive.parent.mkdir(parents=True)
    archive.write_bytes(data[: len(data) // 2] if broken == "truncated" else broken)
    res = fetch_benchmark("cmmlu", url=url)
    assert res.subjects == {"test": 67, "dev": 67} and len(server.requests) == 1
    assert archive.read_bytes() == data


def test_timeout_bounds_the_whole_transfer(server: _Server, cache: Path) -> None:
    """Issue 29, item 6: `--timeout` bounded each read, so a server sending a byte every few seconds never timed
    out; now it bounds the whole download (the server here would take minutes to send the archive)."""
    data = _zip(_cmmlu_files(per_subject=1))
    server.files["/slow.zip"] = data
    server.modes["/slow.zip"] = "trickle"
    url = server.url("/slow.zip")
    line = _one_error_line(_invoke("fetch", "cmmlu", "--url", url, "--timeout", "1"))
    assert "timed out" in line and "--timeout 1" in line and url in line
    part = _archive_path(cache, "cmmlu", url).with_name(_archive_path(cache, "cmmlu", url).name + ".part")
    assert 0 < part.stat().st_size < len(data) // 100  # a few bytes kept for a resume, nothing more
    assert not _archive_path(cache, "cmmlu", url).exists()


def test_duplicate_member_names_are_refused(server: _Server, cache: Path, tmp_path: Path) -> None:
    """Issue 29, item 10(d): a member stored twice under one name was unpacked twice and counted twice."""
    files = _cmmlu_files(per_subject=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate it is asked to write
        data = _raw_zip([*files.items(), ("test/agronomy.csv", ",Question,A,B,C,D,Answer\n0,另一题？,甲,乙,丙,丁,B\n")])
        dotted = _raw_zip([*files.items(), ("./test/agronomy.csv", "x")])
    server.files["/dup.zip"] = data
    url = server.url("/dup.zip")
    line = _one_error_line(_invoke("fetch", "cmmlu", "--url", url))
    assert "'test/agronomy.csv' twice" in line and "ambiguous" in line
    assert not (cache / "benchmarks" / "cmmlu").exists() and not _archive_path(cache, "cmmlu", url).exists()
    archive = tmp_path / "dotted.zip"
    archive.write_bytes(dotted)
    with pytest.raises(FetchError, match=r"'test/agronomy.csv' and './test/agronomy.csv' \(the same file\)"):
        unpack(archive, tmp_path / "out", RELEASES["cmmlu"])
