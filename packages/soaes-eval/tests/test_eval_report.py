"""Acceptance 4: Table 1/2/4-shaped Markdown, CSV and PNG from result files written by real runs in the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from soaes_core.errors import DataError, InvalidArgumentError
from soaes_eval.report import build_tables, load_results, write_tables


@pytest.fixture(scope="module")
def all_runs(tiny_mc_run: tuple[Path, dict[str, Any]], cli_general_run: tuple[Path, str, list[str]],
             domain_runs: dict[str, tuple[Path, dict[str, Any]]]) -> list[Path]:
    return [tiny_mc_run[0] / "results.json", cli_general_run[0], *[d for d, _ in domain_runs.values()]]


def test_tables_from_real_runs(all_runs: list[Path], tmp_path: Path) -> None:
    runs = load_results(all_runs)
    labels = [r.label for r in runs]
    assert labels[:2] == ["tiny-base", "tiny-cpt"]
    tables = {t.name: t for t in build_tables(runs, base="tiny-base")}
    assert set(tables) == {"table1_general", "table2_soaes_domain_qa", "table4_speed"}

    t1 = tables["table1_general"]
    assert t1.columns == ["Model", "CMMLU", "C-EVAL", "Avg.", "Retention (%)", "N items"]
    base, cpt = runs[0], runs[1]
    for row, run in zip(t1.rows, (base, cpt), strict=True):
        cmmlu, ceval = 100 * run.results["soaes_cmmlu"]["acc,none"], 100 * run.results["soaes_ceval"]["acc,none"]
        assert row[:4] == [run.label, pytest.approx(cmmlu), pytest.approx(ceval), pytest.approx((cmmlu + ceval) / 2)]
        assert row[5] == 67 + 52
    base_avg = t1.rows[0][3]
    assert t1.rows[0][4] == pytest.approx(100.0)
    assert t1.rows[1][4] == pytest.approx(100 * t1.rows[1][3] / base_avg)

    t2 = tables["table2_soaes_domain_qa"]
    assert t2.columns == ["Model", "Stage", "Rouge-1", "Rouge-2", "Rouge-l", "BLEU-4", "N items"]
    hf_row = next(r for r in t2.rows if r[0] == "hf")
    hf = next(r for r in runs if r.label == "hf")
    assert hf_row[1] == "stage-2 SFT" and hf_row[6] == 4
    assert hf_row[2] == pytest.approx(hf.results["soaes_domain_qa"]["rouge1,none"])
    assert hf_row[5] == pytest.approx(hf.soaes["text_metrics"]["soaes_domain_qa"]["llamafactory"]["bleu4"])

    t4 = tables["table4_speed"]
    assert [r[0] for r in t4.rows] == ["specdec", "layer", "ar"]
    ar_row = t4.rows[2]
    assert ar_row[3] is None and ar_row[5] == "1.00×"
    sd = next(r for r in runs if r.label == "specdec").soaes["specdec"]
    assert t4.rows[0][3] == pytest.approx(100 * sd["acceptance_rate"])
    assert t4.rows[0][5] == f"{sd['tokens_per_s'] / ar_row[4]:.2f}×"

    written = write_tables(list(tables.values()), tmp_path)
    md = (tmp_path / "tables.md").read_text(encoding="utf-8")
    assert "| Model | CMMLU | C-EVAL | Avg. | Retention (%) | N items |" in md
    assert "| tiny-base |" in md and "Acceptance Rate (%)" in md and "Rouge-1" in md
    header = (tmp_path / "table1_general.csv").read_text().splitlines()[0]
    assert header == "Model,CMMLU,C-EVAL,Avg.,Retention (%),N items"
    for name in ("table1_general", "table2_soaes_domain_qa", "table4_speed"):
        assert written[f"{name}.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_errors(tmp_path: Path, all_runs: list[Path]) -> None:
    with pytest.raises(DataError, match="no such result file"):
        load_results([tmp_path / "missing.json"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": {}}')
    with pytest.raises(DataError, match="not a soaes-eval result file"):
        load_results([bad])
    with pytest.raises(InvalidArgumentError, match="base run 'nope'"):
        build_tables(load_results(all_runs[:2]), base="nope")
