"""Curation steps: the sharded reader gives every document exactly once, in input order, with its line number,
whatever the number of tasks (JSONL files split by byte range at line starts); stage accounting balances."""

from __future__ import annotations

import json
from pathlib import Path

import make_samples
import pytest
from datatrove.data import Document

from soaes_core.errors import DataError
from soaes_data.cleaning import CleanConfig
from soaes_data.readers import FieldMap
from soaes_data.steps import CleanStep, count_read_units, iter_unit, list_input_files, plan_read_units


def _corpus(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    texts = [t for _, t in make_samples.DOMAIN_DOCS]
    lines = [json.dumps({"text": f"{texts[k % len(texts)]}#{k}"}, ensure_ascii=False) for k in range(57)]
    lines[10] = "{broken"
    lines[20] = ""
    (d / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "b.txt").write_text(texts[3], encoding="utf-8")
    (d / "c.json").write_text(json.dumps([{"text": texts[4]}, {"text": texts[5]}], ensure_ascii=False),
                              encoding="utf-8")
    (d / "d.jsonl").write_text(json.dumps({"text": texts[6]}, ensure_ascii=False), encoding="utf-8")  # no newline
    (d / "e.jsonl").write_bytes(b"")
    (d / ".hidden.txt").write_text("x", encoding="utf-8")
    (d / "notes.csv").write_text("a,b", encoding="utf-8")
    return d


def _read_all(d: Path, tasks: int) -> list[tuple[str, str, int | None, int]]:
    units = plan_read_units(list_input_files([str(d)]), tasks)
    out = []
    for rank_units in units:
        for unit in rank_units:
            for item in iter_unit(unit, FieldMap()):
                if isinstance(item, DataError):
                    out.append(("error", str(item.path), item.line, -1))
                else:
                    out.append((item.id, item.metadata["source"], item.metadata["meta"].get("line"),
                                item.metadata["order"]))
    return out


@pytest.mark.parametrize("tasks", [2, 3, 5, 16, 200])
def test_sharded_read_gives_each_document_once_in_order(tmp_path: Path, tasks: int) -> None:
    d = _corpus(tmp_path)
    whole = _read_all(d, 1)
    assert [Path(f.path).name for f in list_input_files([str(d)])] == ["a.jsonl", "b.txt", "c.json", "d.jsonl",
                                                                       "e.jsonl"]
    assert len(whole) == 57 - 1 + 1 + 2 + 1  # one blank line skipped; the broken line is an error
    assert ("error", str(d / "a.jsonl"), 11, -1) in whole
    lines = [x[2] for x in whole if x[1].endswith("a.jsonl") and x[0] != "error"]
    assert lines == [k + 1 for k in range(57) if k not in (10, 20)]
    assert _read_all(d, tasks) == whole
    orders = [x[3] for x in whole if x[0] != "error"]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)


def test_count_read_units_bounds_the_tasks_that_read_anything(tmp_path: Path) -> None:
    """Issue 29: `tasks` is capped to this count; a task beyond it would get no document."""
    files = list_input_files([str(_corpus(tmp_path))])
    assert count_read_units(files, 10**6) == 57 + 1 + 1 + 1  # a.jsonl's line starts, b.txt, c.json, d.jsonl
    assert count_read_units(files, 5) == 5
    busy = [rank for rank, units in enumerate(plan_read_units(files, 200))
            if any(True for unit in units for _ in iter_unit(unit, FieldMap()))]
    assert 57 <= len(busy) <= count_read_units(files, 200)


def test_stage_accounting_balances(tmp_path: Path) -> None:
    docs = [Document(text=t, id=str(k), metadata={"source": "s", "meta": {"line": k}, "order": k})
            for k, t in enumerate(["正文内容。", "\u200b\u200b", "另一篇正文。"])]
    step = CleanStep(1, CleanConfig(), str(tmp_path / "parts"))
    kept = list(step.run(iter(docs), rank=3, world_size=4))
    assert [d.id for d in kept] == ["0", "2"]
    counts = json.loads((tmp_path / "parts" / "01_clean" / "00003.counts.json").read_text(encoding="utf-8"))
    assert counts["in"] == 3 and counts["kept"] == 2 and counts["dropped_by_reason"] == {"empty_after_cleaning": 1}
    rejects = (tmp_path / "parts" / "01_clean" / "00003.rejects.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(r)["id"] for r in rejects] == ["1"] and json.loads(rejects[0])["line"] == 1
