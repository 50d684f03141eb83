"""soaes.pipeline.paper_tables (the report stage's builder): Tables 1-6 from a pipeline run folder (built here by
hand, in the layout the stages write)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from soaes.pipeline.paper_tables import build_run_tables, write_run_report
from soaes_core import write_manifest
from soaes_core.errors import DataError


def _stage(run: Path, nn: int, name: str) -> Path:
    d = run / "stages" / f"{nn:02d}_{name}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _results(folder: Path, results: dict, num_items: dict, text: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    soaes = {"num_items": num_items, "text_metrics": {"soaes_domain_qa": {"llamafactory": text}} if text else {}}
    (folder / "results.json").write_text(json.dumps({"results": results, "soaes": soaes}), encoding="utf-8")
    write_manifest(folder, "eval")


def _bench_row(method: str, mode: str, n: int | None, tps: float, acc: float | None = None) -> dict:
    return {"method": method, "mode": mode, "n": n, "tokens_per_s": tps, "acceptance_rate": acc}


def _bench(folder: Path, rows: list[dict], modes: list[str], ns: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"modes": modes, "num_speculative_tokens": ns, "max_new_tokens": 16, "repeats": 3, "dtype": "float32",
           "reference_dtype": "bfloat16", "top_p": 0.7}
    (folder / "bench.json").write_text(json.dumps({"config": cfg, "num_prompts": 4, "results": rows}))
    write_manifest(folder, "specdec-bench")


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    ev = _stage(root, 12, "eval")
    general = {"soaes_cmmlu_a": {"acc,none": 0.5}, "soaes_cmmlu_b": {"acc,none": 0.25},
               "soaes_ceval_c": {"acc,none": 0.4}}
    _results(ev / "base" / "general", general, {"soaes_cmmlu_a": 2, "soaes_cmmlu_b": 2, "soaes_ceval_c": 5})
    after = {k: {"acc,none": v["acc,none"] * 0.99} for k, v in general.items()}
    _results(ev / "cpt" / "general", after, {"soaes_cmmlu_a": 2, "soaes_cmmlu_b": 2, "soaes_ceval_c": 5})
    for label, r1 in (("base", 10.0), ("cpt", 12.0), ("sft_stage2", 20.0)):
        _results(ev / label / "domain", {}, {}, {"rouge1": r1, "rouge2": 1.0, "rougeL": 2.0, "bleu4": r1 / 2,
                                                "num_items": 8})
    index = [{"label": "base", "stage": "base", "kind": "target", "general": "base/general", "domain": "base/domain"},
             {"label": "cpt", "stage": "CPT", "kind": "target", "general": "cpt/general", "domain": "cpt/domain"},
             {"label": "sft_stage2", "stage": "CPT + stage 1 + 2", "kind": "target", "domain": "sft_stage2/domain"}]
    (ev / "index.json").write_text(json.dumps(index))
    write_manifest(ev, "pipeline.eval")
    dd = _stage(root, 10, "distill_draft")
    (dd / "drafts.json").write_text(json.dumps({
        "undistilled": {"dir": "undistilled", "offline_acceptance": {"acceptance_rate_greedy_n3": 0.3}},
        "distilled": {"dir": "distilled/model", "alpha": 0.5, "temperature": 2.0,
                      "offline_acceptance": {"acceptance_rate_greedy_n3": 0.6}}}))
    write_manifest(dd, "pipeline.distill_draft")
    sb = _stage(root, 11, "specdec_bench")
    rows = []
    for mode in ("greedy", "top_p"):
        rows += [_bench_row("plain", mode, None, 10.0), _bench_row("plain_reference", mode, None, 20.0),
                 _bench_row("speculative", mode, 3, 30.0 if mode == "greedy" else 24.0, 0.7),
                 _bench_row("speculative", mode, 5, 26.0 if mode == "greedy" else 22.0, 0.6),
                 _bench_row("prompt_lookup", mode, 3, 22.0, 0.2), _bench_row("prompt_lookup", mode, 5, 21.0, 0.1)]
    _bench(sb / "distilled", rows, ["greedy", "top_p"], [3, 5])
    _bench(sb / "undistilled", [_bench_row("plain", "greedy", None, 12.0),
                                _bench_row("plain_reference", "greedy", None, 8.0),
                                _bench_row("speculative", "greedy", 3, 11.0, 0.4)], ["greedy"], [3])
    (sb / "exactness.json").write_text(json.dumps({"prompts": 2, "n": 3, "max_new_tokens": 16,
                                                   "float32": {"identical": 2, "exact": True}, "exact": True}))
    write_manifest(sb, "pipeline.specdec_bench")
    return root


def _cells(table) -> list[list]:
    return [[c.value if hasattr(c, "value") else c for c in row] for row in table.rows]


def test_tables_and_directions(run: Path) -> None:
    tables = {t.name: t for t in build_run_tables(run)}
    assert set(tables) == {"table1_general", "table2_stages", "table4_drafts", "table5_spd_vs_lookup",
                           "table6_greedy_vs_top_p"}
    t1 = _cells(tables["table1_general"])
    assert t1[0][1] == pytest.approx(37.5) and t1[0][2] == pytest.approx(40.0)  # CMMLU weighted over 2 subtasks
    assert t1[1][4] == pytest.approx(99.0)
    assert tables["table1_general"].direction.startswith("reproduces")
    assert "CMMLU 4, C-EVAL 5 items" in tables["table1_general"].sizes
    assert tables["table2_stages"].direction.startswith("reproduces")
    t4 = _cells(tables["table4_drafts"])
    # the undistilled bench's fastest plain is its fp32 plain (12 tok/s), the distilled bench's its bf16 (20 tok/s)
    assert t4[0][5] == 12.0 and t4[1][6] == pytest.approx(11.0 / 12.0) and t4[2][6] == pytest.approx(1.5)
    assert t4[2][3] == pytest.approx(70.0) and t4[2][4] == pytest.approx(60.0)
    assert tables["table4_drafts"].direction.startswith("reproduces")
    t5 = _cells(tables["table5_spd_vs_lookup"])
    assert t5[0][3] == 1.0 and t5[1][3] == pytest.approx(24.0 / 20.0) and t5[3][3] == pytest.approx(22.0 / 20.0)
    assert tables["table5_spd_vs_lookup"].direction.startswith("reproduces")
    t6 = tables["table6_greedy_vs_top_p"]
    assert t6.direction.startswith("reproduces") and "greedy 1.50× vs top-p 1.20×" in t6.direction


def test_table5_adds_the_draft_with_prompt_lookup_when_benchmarked(run: Path) -> None:
    bench = run / "stages" / "11_specdec_bench" / "distilled" / "bench.json"
    data = json.loads(bench.read_text())
    data["config"]["methods"] = ["plain", "prompt_lookup", "speculative", "speculative_lookup"]
    data["results"] += [_bench_row("speculative_lookup", "top_p", 3, 32.0, 0.75)]
    bench.write_text(json.dumps(data))
    t5 = _cells(next(t for t in build_run_tables(run) if t.name == "table5_spd_vs_lookup"))
    assert t5[-2][:2] == ["SPD + prompt lookup", 3] and t5[-2][3] == pytest.approx(32.0 / 20.0)
    assert t5[-1][:2] == ["SPD + prompt lookup", 5] and t5[-1][3] is None  # not benchmarked at n = 5
    t6 = _cells(next(t for t in build_run_tables(run) if t.name == "table6_greedy_vs_top_p"))
    assert t6[2][1] == "SPD + prompt lookup (n = 3)" and t6[2][3] == pytest.approx(32.0 / 20.0)
    assert [r[1] for r in t6].count("SPD + prompt lookup (n = 3)") == 1  # greedy has no such row


def test_without_n3_table6_uses_the_fastest_n_and_table4_says_why_it_is_unchecked(run: Path) -> None:
    bench = run / "stages" / "11_specdec_bench" / "distilled" / "bench.json"
    data = json.loads(bench.read_text())
    data["results"] = [r for r in data["results"] if r["n"] != 3]
    bench.write_text(json.dumps(data))
    tables = {t.name: t for t in build_run_tables(run)}
    t6 = _cells(tables["table6_greedy_vs_top_p"])
    assert t6[1][1] == "SPD (n = 5, its fastest; n = 3 not run)" and t6[1][3] == pytest.approx(22.0 / 20.0)
    assert tables["table6_greedy_vs_top_p"].direction.startswith("reproduces")
    assert "not benchmarked at n = 3" in tables["table4_drafts"].direction


def test_direction_says_when_the_paper_does_not_reproduce(run: Path) -> None:
    bench = run / "stages" / "11_specdec_bench" / "undistilled" / "bench.json"
    data = json.loads(bench.read_text())
    data["results"][2]["acceptance_rate"] = 0.9  # undistilled above distilled
    bench.write_text(json.dumps(data))
    t4 = next(t for t in build_run_tables(run) if t.name == "table4_drafts")
    assert t4.direction.startswith("does not reproduce")


def test_report_links_every_number_to_an_existing_manifest(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    written = write_run_report(run, out, recipe_name="t", plots=False)
    assert "table4_drafts" in written["tables"]
    report = (out / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"\[[-0-9.]+\]\(([^)]+)\)", report)
    assert len(links) > 20 and all((out / link).resolve().is_file() for link in links)
    assert report.count("Sample sizes:") == 5 and "**True**" in report
    assert (out / "table5_spd_vs_lookup.csv").is_file()


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a soaes pipeline run folder"):
        build_run_tables(tmp_path)
