"""`FileHashCache`: an unchanged file is hashed once; any change to its content (even same size, mtime put back)
is hashed again; a damaged cache file is ignored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from soaes_core import hashing
from soaes_core.hashing import FileHashCache, sha256_file


def test_unchanged_file_is_hashed_once_and_a_same_size_edit_is_seen(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "data.bin"
    f.write_bytes(b"a" * 1000)
    calls: list[Path] = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: calls.append(Path(p)) or real(p))
    cache = FileHashCache(tmp_path / "cache.json")
    before = cache.sha256(f)
    assert before == sha256_file(f)
    cache.save()
    again = FileHashCache(tmp_path / "cache.json")  # a later process
    assert again.sha256(f) == before and len(calls) == 1
    st = f.stat()
    with open(f, "r+b") as fh:  # same size, mtime restored: only ctime tells
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = again.sha256(f)
    assert after == sha256_file(f) != before and len(calls) == 2


def test_tree_hash_covers_names_and_contents_but_not_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "a.txt").write_text("x")
    (tmp_path / "m" / "sub" / "b.txt").write_text("y")
    cache = FileHashCache()
    before = cache.tree_sha256(tmp_path / "m")
    (tmp_path / "m" / ".tmp.partial").write_text("temp")
    assert cache.tree_sha256(tmp_path / "m") == before
    (tmp_path / "m" / "sub" / "b.txt").rename(tmp_path / "m" / "sub" / "c.txt")
    assert cache.tree_sha256(tmp_path / "m") != before


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"[]", b'{"version": 1, "files": 3}'])
def test_damaged_cache_file_is_ignored(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "cache.json").write_bytes(content)
    (tmp_path / "f").write_text("z")
    cache = FileHashCache(tmp_path / "cache.json")
    assert cache.sha256(tmp_path / "f") == sha256_file(tmp_path / "f")
    cache.save()
    assert FileHashCache(tmp_path / "cache.json").sha256(tmp_path / "f") == sha256_file(tmp_path / "f")
