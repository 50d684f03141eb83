"""JSONL reading names the file and line of bad input, or records it as a reject."""

from __future__ import annotations

from pathlib import Path

import pytest

from soaes_core.errors import DataError
from soaes_core.jsonl import JsonlReject, iter_jsonl, read_jsonl, write_jsonl


def test_round_trip_with_bom_and_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": "\xe5\x9b\xbd"}\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": "国"}]
    write_jsonl(tmp_path / "o.jsonl", [{"t": "国资"}])
    assert read_jsonl(tmp_path / "o.jsonl") == [{"t": "国资"}]


def test_bad_line_error_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n{"a": \n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        read_jsonl(p)
    rejects: list[JsonlReject] = []
    kept = list(iter_jsonl(p, on_error="skip", rejects=rejects))
    assert [r.line for r in kept] == [1]
    assert [(r.line, r.reason.split(":")[0]) for r in rejects] == [(2, "invalid JSON"), (3, "invalid JSON")]
    assert "expected a JSON object" in rejects[1].reason


def test_invalid_utf8_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8"):
        read_jsonl(p)
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
