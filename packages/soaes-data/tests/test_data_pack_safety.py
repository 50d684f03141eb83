"""`soaes-data pack` loses nothing: it never replaces a directory it did not write (issue 15 defect 1), accounts
for over-long conversations (defect 5) and answers bad options with one line (defect 8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from soaes_core import read_manifest
from soaes_data.chat import encode_chat
from soaes_data.cli import main
from soaes_data.packed_io import read_packed_dataset
from soaes_data.samples import sample_path

POOL = sample_path("sft/expert_pool.jsonl")


def _one_line_error(r: Any, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert lines[-1].startswith(("error:", "Error:")), r.output
    for needle in needles:
        assert needle in lines[-1], r.output


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_pack_into_the_input_folder_keeps_everything(tmp_path: Path) -> None:
    """The repro: a folder holding train.jsonl and notes.txt, packed with -o that folder."""
    folder = tmp_path / "work"
    folder.mkdir()
    shutil.copy(POOL, folder / "train.jsonl")
    (folder / "notes.txt").write_text("my notes\n", encoding="utf-8")
    before = _snapshot(folder)
    r = CliRunner().invoke(main, ["pack", str(folder / "train.jsonl"), "-o", str(folder), "--max-length", "1024"])
    _one_line_error(r, "contains, the input")
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no temp or .old directory left beside it


def test_pack_refuses_foreign_or_current_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = CliRunner()
    src = tmp_path / "train.jsonl"
    shutil.copy(POOL, src)
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.docx").write_bytes(b"not ours")
    _one_line_error(run.invoke(main, ["pack", str(src), "-o", str(other)]), "not a previous `soaes-data pack` output")
    assert (other / "report.docx").read_bytes() == b"not ours"
    _one_line_error(run.invoke(main, ["pack", str(src), "-o", str(src)]), "not a directory")
    # `-o .` (issue 15 defect 8): from the input's folder, and from an empty folder elsewhere
    monkeypatch.chdir(tmp_path)
    _one_line_error(run.invoke(main, ["pack", "train.jsonl", "-o", "."]), "contains, the input")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    _one_line_error(run.invoke(main, ["pack", str(src), "-o", "."]), "current directory")
    assert src.read_bytes() == POOL.read_bytes() and empty.is_dir()
    # a previous output of the same command may be replaced, unless a user file was added to it
    out = tmp_path / "packed"
    for _ in range(2):
        r = run.invoke(main, ["pack", str(src), "-o", str(out), "--max-length", "1024"])
        assert r.exit_code == 0, r.output
    (out / "notes.txt").write_text("added later", encoding="utf-8")
    _one_line_error(run.invoke(main, ["pack", str(src), "-o", str(out)]), "did not write (notes.txt)")
    assert (out / "notes.txt").read_text(encoding="utf-8") == "added later"


def _lengths(tokenizer: Any) -> list[int]:
    rows = [json.loads(x) for x in POOL.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [len(encode_chat(tokenizer, r["messages"])["input_ids"]) for r in rows]


def test_overlong_is_dropped_and_accounted_by_default(tmp_path: Path, embedded_tokenizer: Any) -> None:
    """The sample expert pool at --max-length 128: over-long conversations were silently truncated."""
    lengths = _lengths(embedded_tokenizer)
    overlong = [i + 1 for i, n in enumerate(lengths) if n > 128]
    assert 0 < len(overlong) < len(lengths)
    r = CliRunner().invoke(main, ["pack", str(POOL), "-o", str(tmp_path / "p"), "--max-length", "128"])
    assert r.exit_code == 0, r.output
    assert f"dropped {len(overlong)} (overlong={len(overlong)})" in r.output
    counts = read_manifest(tmp_path / "p")["counts"]
    assert counts["in"] == len(lengths) == counts["kept"] + counts["dropped"]
    assert counts["dropped"] == len(overlong) and counts["dropped_by_reason"] == {"overlong": len(overlong)}
    assert counts["truncated"] == 0
    rejects = [json.loads(x) for x in (tmp_path / "p" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["line"] for x in rejects] == overlong
    assert all(x["kind"] == "overlong" and "> max_length 128" in x["reason"] for x in rejects)
    ds = read_packed_dataset(tmp_path / "p", tokenizer=embedded_tokenizer)
    assert sorted(n for row in ds for n in row["seq_lengths"]) == sorted(n for n in lengths if n <= 128)


def test_overlong_truncate_counts_and_error_stops(tmp_path: Path, embedded_tokenizer: Any) -> None:
    lengths = _lengths(embedded_tokenizer)
    n_over = sum(n > 128 for n in lengths)
    run = CliRunner()
    r = run.invoke(main, ["pack", str(POOL), "-o", str(tmp_path / "t"), "--max-length", "128", "--overlong",
                          "truncate"])
    assert r.exit_code == 0, r.output
    counts = read_manifest(tmp_path / "t")["counts"]
    assert counts["in"] == len(lengths) == counts["kept"] + counts["dropped"]
    assert counts["truncated"] + counts["dropped"] == n_over  # cut, or dropped when nothing supervised was left
    assert all(len(row["input_ids"]) <= 128 for row in read_packed_dataset(tmp_path / "t"))
    first = next(i + 1 for i, n in enumerate(lengths) if n > 128)
    r = run.invoke(main, ["pack", str(POOL), "-o", str(tmp_path / "e"), "--max-length", "128", "--overlong", "error"])
    _one_line_error(r, f"expert_pool.jsonl:{first}", "> max_length 128")
    assert not (tmp_path / "e").exists()
    r = run.invoke(main, ["pack", str(POOL), "-o", str(tmp_path / "c"), "--mode", "cpt", "--overlong", "drop"])
    _one_line_error(r, "overlong applies to sft mode")
    _one_line_error(run.invoke(main, ["pack", str(POOL), "-o", str(tmp_path / "z"), "--max-length", "0"]),
                    "max_length must be >= 1")


def test_num_proc_zero_is_rejected(tmp_path: Path) -> None:
    """`--num-proc 0` used to be ignored silently (issue 15 defect 8)."""
    r = CliRunner().invoke(main, ["curate", str(sample_path("recipe.yaml")), "-o", str(tmp_path / "c"),
                                  "--num-proc", "0"])
    _one_line_error(r, "num_proc must be >= 1")
    assert not (tmp_path / "c").exists()
