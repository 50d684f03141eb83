"""`soaes demo --quick` (= `soaes pipeline run demo --quick`) end to end on the embedded model: every stage's
manifest, the report's tables, a second run that does no work, and a run killed inside a stage that reruns to the
same numbers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from soaes.cli import main
from soaes.pipeline import STAGES, load_pipeline_recipe, plan_pipeline, stage_dirname
from soaes.pipeline.stages import FAIL_ENV

pytestmark = pytest.mark.slow
RECIPE = load_pipeline_recipe("demo", quick=True)


def _run(out: Path, *extra: str, env: dict[str, str] | None = None) -> object:
    # one torch thread: on a shared CI machine two threads can be several times slower (threads are not hashed)
    return CliRunner().invoke(main, ["demo", "--quick", "-o", str(out), "--set", "threads=1", *extra], env=env)


# `quick_run` (tests/conftest.py): one uninterrupted quick run, shared with test_soaes_pipeline_faults.py


def _manifest(run: Path, name: str) -> dict:
    return json.loads((run / "stages" / stage_dirname(name) / "manifest.json").read_text(encoding="utf-8"))


def _report(run: Path) -> str:
    return (run / "stages" / stage_dirname("report") / "report.md").read_text(encoding="utf-8")


def _table_numbers(report: str, title: str) -> list[str]:
    """The linked numbers of one table of report.md, in order."""
    section = report.split(title, 1)[1].split("Sample sizes:", 1)[0]
    return re.findall(r"\[([-0-9.]+)\]\(", section)


def test_every_stage_writes_a_manifest(quick_run: Path) -> None:
    assert set(RECIPE.stages) <= set(STAGES)
    for name in RECIPE.stages:
        m = _manifest(quick_run, name)
        assert m["stage"] == f"pipeline.{name}"
        assert m["pipeline"]["config_sha256"] and m["outputs"] and m["versions"]["soaes-core"]
        assert m["timings_s"]["total"] > 0
    assert not list((quick_run / "stages").glob(".*"))  # no partial or old folders left behind
    # the draft is distilled from the SFT stage-2 model, not the base model
    distill = _manifest(quick_run, "distill_draft")["pipeline"]["inputs"]["target"]
    assert distill["path"].endswith(f"{stage_dirname('sft_stage2')}/model")
    assert distill["sha256"].startswith("manifest:")
    drafts = json.loads((quick_run / "stages" / stage_dirname("distill_draft") / "drafts.json").read_text())
    assert set(drafts) == {"undistilled", "distilled"}
    assert 0.0 <= drafts["distilled"]["offline_acceptance"]["acceptance_greedy"] <= 1.0


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{f.name}:{k}": v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def _max_change(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa, (a, b)
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def test_every_training_stage_moves_the_weights(quick_run: Path) -> None:
    """--quick really trains: each stage's model differs from its input model by at least about one Adam step at
    the stage's learning rate, and the distilled draft differs from the undistilled one."""
    from soaes_core import resolve_model_dir

    parents = {"cpt": resolve_model_dir(RECIPE.target), "sft_stage1": None, "sft_stage2": None}
    prev = None
    for name in ("cpt", "sft_stage1", "sft_stage2"):
        model = quick_run / "stages" / stage_dirname(name) / "model"
        parent = parents[name] or prev
        train = getattr(RECIPE, name).train
        assert _manifest(quick_run, name)["counts"]["metrics"]["global_step"] == train.max_steps >= 3
        assert _max_change(model, parent) > 0.5 * train.learning_rate, name  # Adam's first step moves ~lr
        prev = model
    ddir = quick_run / "stages" / stage_dirname("distill_draft")
    drafts = json.loads((ddir / "drafts.json").read_text())
    assert drafts["distilled"]["steps"] == RECIPE.distill_draft.feature.steps
    assert _max_change(ddir / drafts["distilled"]["dir"], ddir / drafts["undistilled"]["dir"]) > 0
    assert drafts["distilled"]["offline_acceptance"] != drafts["undistilled"]["offline_acceptance"]


def test_report_has_the_paper_tables_with_links_sizes_and_directions(quick_run: Path) -> None:
    report = _report(quick_run)
    for title in ("Table 1:", "Table 2:", "Table 4:", "Table 5:", "Table 6:"):
        assert title in report
        assert _table_numbers(report, title), title
    assert report.count("Sample sizes:") == 5 and report.count("Paper's direction:") == 5
    assert "Greedy speculative output equals plain greedy output token for token: **True**" in report
    base = quick_run / "stages" / stage_dirname("report")
    links = re.findall(r"\]\(([^)]+manifest\.json)\)", report)
    assert links and all((base / link).resolve().is_file() for link in links)
    for png in ("table1_general.png", "table2_stages.png", "table4_drafts.png", "table5_spd_vs_lookup.png",
                "table6_greedy_vs_top_p.png"):
        assert (base / png).stat().st_size > 1000
    # each speedup is over the fastest plain decoding in the same bench run: the plain rows read 1.00
    assert _table_numbers(report, "Table 5:")[1] == "1.00"
    assert "| SPD + prompt lookup | 3 |" in report.split("Table 5:", 1)[1].split("Table 6:", 1)[0]  # lookup_tokens


def test_export_hands_off_the_draft(quick_run: Path) -> None:
    """The demo's draft is a feature draft: exported in soaes's format (vLLM's EAGLE-1 layout differs, so no vLLM
    command), with the soaes serving command; reloaded, it decodes exactly as plain greedy decoding."""
    import torch

    from soaes_core import encode_chat_prompt, load_model, load_tokenizer
    from soaes_specdec import SpeculativeDecoder, autoregressive_generate
    from soaes_specdec.feature_draft import FeatureDraft, is_feature_draft_dir

    serve = (quick_run / "stages" / stage_dirname("export") / "serve").resolve()
    target = (quick_run / "stages" / stage_dirname("sft_stage2") / "model").resolve()
    assert is_feature_draft_dir(serve / "draft") and not (serve / "vllm_serve.sh").exists()
    readme = (serve / "README.md").read_text(encoding="utf-8")
    assert f"soaes-specdec generate --target {target}" in readme and "EAGLE-1" in readme
    counts = _manifest(quick_run, "export")["counts"]
    assert counts["kind"] == "feature" and counts["n_from"] == "bench" and counts["vllm_serve"] is None
    assert counts["engines"] == {}  # the demo's draft has soaes's layout: no vLLM/SGLang EAGLE export
    assert counts["soaes_serve"].startswith(f"soaes serve --target {target} --draft {serve / 'draft'} -n ")
    assert counts["soaes_serve"] in (serve / "soaes_serve.sh").read_text(encoding="utf-8")
    model = load_model(str(target), dtype=torch.float32)
    ids = torch.tensor([encode_chat_prompt(load_tokenizer(str(target)), "什么是增值税？")])
    dec = SpeculativeDecoder(model, FeatureDraft.from_pretrained(serve / "draft", dtype=torch.float32), 3)
    assert torch.equal(dec.generate(ids, max_new_tokens=12).sequences,
                       autoregressive_generate(model, ids, max_new_tokens=12).sequences)


def test_second_run_does_no_work(quick_run: Path) -> None:
    before = {n: (quick_run / "stages" / stage_dirname(n) / "manifest.json").read_bytes() for n in RECIPE.stages}
    res = _run(quick_run)
    assert res.exit_code == 0, res.output
    assert res.output.count(": up to date") == len(RECIPE.stages)
    assert "ran 0 stage(s)" in res.output
    after = {n: (quick_run / "stages" / stage_dirname(n) / "manifest.json").read_bytes() for n in RECIPE.stages}
    assert before == after
    assert all(p.status == "up-to-date" for p in plan_pipeline(RECIPE, quick_run))


def test_plan_says_what_a_config_change_reruns(quick_run: Path) -> None:
    changed = load_pipeline_recipe("demo", quick=True, overrides={"distill_draft.feature.learning_rate": 1e-4})
    status = {p.name: (p.status, p.reason) for p in plan_pipeline(changed, quick_run)}
    assert status["sft_stage2"][0] == "up-to-date" and status["eval"][0] == "up-to-date"
    assert status["distill_draft"] == ("will run", "config changed")
    assert status["teacher_data"][0] == "up-to-date"  # the teacher's answers still serve
    assert status["specdec_bench"] == ("will run", "input stage 'distill_draft' will run")


def test_killed_stage_reruns_to_the_same_numbers(quick_run: Path, copy_quick_run) -> None:
    run = copy_quick_run()  # hard links: stages replace folders, never edit files
    for name in ("distill_draft", "specdec_bench", "report"):
        shutil.rmtree(run / "stages" / stage_dirname(name))
    res = _run(run, env={FAIL_ENV: "distill_draft:before_train"})
    assert res.exit_code == 2 and "injected failure" in res.output
    assert not (run / "stages" / stage_dirname("distill_draft")).exists()  # no half output in place
    assert (run / "stages" / f".{stage_dirname('distill_draft')}.partial").is_dir()
    res = _run(run)
    assert res.exit_code == 0, res.output
    assert "distill_draft: ran in" in res.output and "sft_stage2: up to date" in res.output
    old, new = _report(quick_run), _report(run)
    for title in ("Table 1:", "Table 2:"):
        assert _table_numbers(new, title) == _table_numbers(old, title)
    rd = stage_dirname("distill_draft")
    a = json.loads((quick_run / "stages" / rd / "drafts.json").read_text())
    b = json.loads((run / "stages" / rd / "drafts.json").read_text())
    for key in ("undistilled", "distilled"):
        assert a[key]["offline_acceptance"] == b[key]["offline_acceptance"], key
    sb = stage_dirname("specdec_bench")
    for key in ("undistilled", "distilled"):
        acc = [{(r["method"], r["mode"], r["n"]): r["acceptance_rate"] for r in
                json.loads((root / "stages" / sb / key / "bench.json").read_text())["results"]}
               for root in (quick_run, run)]
        assert acc[0] == acc[1], key


def test_report_rebuilds_from_the_run_folder(quick_run: Path, tmp_path: Path) -> None:
    from soaes.pipeline.paper_tables import write_run_report

    write_run_report(quick_run, tmp_path / "tables", plots=False)
    report = (tmp_path / "tables" / "report.md").read_text(encoding="utf-8")
    assert _table_numbers(report, "Table 4:") == _table_numbers(_report(quick_run), "Table 4:")
    links = re.findall(r"\]\(([^)]+manifest\.json)\)", report)
    assert links and all((tmp_path / "tables" / link).resolve().is_file() for link in links)
