"""Placement in the pipeline: a recipe-level `placement:` with per-stage overrides, resolved and checked before any
work, fingerprints unchanged where `auto` means what the stages used before (the CPU in float32), and no stage
module hard-codes a device."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from soaes.cli import main
from soaes.pipeline import load_pipeline_recipe, plan_pipeline
from soaes.pipeline.recipe import MODEL_STAGES
from soaes.pipeline.runner import _sha_json
from soaes.pipeline.stages import placed
from soaes_core import to_dict
from soaes_core.testing.cli import one_error_line

PIPELINE_DIR = Path(__file__).resolve().parents[1] / "src" / "soaes" / "pipeline"
LITERAL = re.compile(r"""device\s*=\s*["']cpu["']|torch\.device\(\s*["']cpu["']\s*\)""")


def literal_devices(source: str) -> list[int]:
    """Lines of `source` that name a device literally: `device="cpu"` (or any string) as a keyword argument,
    `torch.device("cpu")`, or the same text in a string the AST does not see (an exec'd snippet, a template)."""
    lines = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg == "device" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                lines.add(node.lineno)
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "device" and isinstance(func.value, ast.Name)
                and func.value.id == "torch" and node.args and isinstance(node.args[0], ast.Constant)):
            lines.add(node.lineno)
    lines.update(i for i, text in enumerate(source.splitlines(), 1) if LITERAL.search(text))
    return sorted(lines)


def test_the_scan_finds_literal_devices() -> None:
    bad = ('m = load_model(spec, dtype=torch.float32, device="cpu")\n'
           "x = y.to(torch.device('cpu'))\n"
           "z = load_model(spec, device='cuda')\n"
           "ok = load_model(spec, **placement.load_kwargs())\n")
    assert literal_devices(bad) == [1, 2, 3]


@pytest.mark.parametrize("module", sorted(PIPELINE_DIR.glob("*.py")), ids=lambda p: p.name)
def test_no_stage_module_hard_codes_a_device(module: Path) -> None:
    found = literal_devices(module.read_text(encoding="utf-8"))
    assert not found, f"{module}: literal device at line(s) {found}; use the recipe's placement (stage_placement)"


def legacy_extra(recipe: Any) -> dict[str, dict[str, Any]]:
    """What each model-running stage hashed besides its section before placements existed."""
    temperatures = sorted({float(recipe.distill_draft.kd.temperature)})
    extra = {"teacher_data": {"seed": recipe.seed}, "dump_logits": {"temperatures": temperatures},
             "distill_draft": {"seed": recipe.seed}, "specdec_bench": {"seed": recipe.seed},
             "eval": {"target": recipe.target}}
    return {name: e for name, e in extra.items() if name in recipe.stages}


def test_auto_and_explicit_cpu_plan_alike(tmp_path: Path) -> None:
    auto = load_pipeline_recipe("demo")
    cpu = load_pipeline_recipe("demo", overrides={"placement.device": "cpu", "placement.dtype": "float32"})
    assert (auto.placement.device, cpu.placement.device) == ("auto", "cpu")
    here = "cuda" if torch.cuda.is_available() else "cpu"
    for name in MODEL_STAGES:
        assert placed(auto, name).device == here
        assert (placed(cpu, name).device, placed(cpu, name).dtype) == ("cpu", "float32")
    plans = {p.name: p for p in plan_pipeline(cpu, tmp_path / "run")}
    assert [p.status for p in plans.values()] == ["will run"] * len(cpu.stages)
    for name, extra in legacy_extra(cpu).items():  # the config hash as computed before placements existed
        assert "placement" not in to_dict(getattr(cpu, name))
        assert plans[name].fingerprint["config_sha256"] == _sha_json({"settings": to_dict(getattr(cpu, name)),
                                                                      "extra": extra}), name
    if here == "cpu":
        auto_plans = {p.name: p for p in plan_pipeline(auto, tmp_path / "run")}
        assert all(auto_plans[n].fingerprint["config_sha256"] == plans[n].fingerprint["config_sha256"]
                   for n in cpu.stages)


def test_a_stage_override_changes_only_that_stage(tmp_path: Path) -> None:
    base = load_pipeline_recipe("demo", overrides={"placement.device": "cpu"})
    bf16 = load_pipeline_recipe("demo", overrides={"placement.device": "cpu", "teacher_data.placement.dtype": "bf16"})
    assert placed(bf16, "teacher_data").dtype == "bfloat16"
    assert placed(bf16, "specdec_bench").dtype == "float32"
    a = {p.name: p.fingerprint["config_sha256"] for p in plan_pipeline(base, tmp_path / "a")}
    b = {p.name: p.fingerprint["config_sha256"] for p in plan_pipeline(bf16, tmp_path / "b")}
    assert {n for n in a if a[n] != b[n]} == {"teacher_data"}
    # sharding moves weights, not results: an offload folder alone keeps the fingerprint
    sharded = load_pipeline_recipe("demo", overrides={"placement.device": "cpu", "placement.device_map": "auto",
                                                      "placement.offload_folder": str(tmp_path / "off")})
    c = {p.name: p.fingerprint["config_sha256"] for p in plan_pipeline(sharded, tmp_path / "c")}
    assert c == a


def _cli_error(*args: str) -> str:
    return one_error_line(main, *args)


def test_bad_placement_is_one_line() -> None:
    line = _cli_error("pipeline", "plan", "demo", "--set", "placement.device=tpu")
    assert "demo.yaml: placement: device: expected auto, cpu, cuda, cuda:N or mps, got 'tpu'" in line
    line = _cli_error("pipeline", "plan", "demo", "--set", "eval.placement.max_memory={cpu: 1GiB}")
    assert "eval.placement: max_memory: needs a device_map" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given without a GPU")
def test_cuda_without_a_gpu_is_refused_before_any_work() -> None:
    line = _cli_error("pipeline", "plan", "demo", "--set", "distill_draft.placement.device=cuda")
    assert "distill_draft.placement: device: cuda asked for, but no CUDA GPU is available" in line
