"""Recipe sections are the packages' config dataclasses: a field a package adds is a recipe key with no pipeline
change, the pipeline's own defaults are overrides in one place, `plan` prints each stage's effective config, and the
pipeline's modules form no import cycle."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import sys
from pathlib import Path

import pytest
import yaml

import soaes.pipeline
from soaes.pipeline import STAGE_ORDER, STAGES, load_pipeline_recipe
from soaes.pipeline.recipe import SECTION_DEFAULTS, package_config
from soaes_core.testing.cli import one_error_line

SRC = Path(soaes.pipeline.__file__).resolve().parent.parent


def _recipe(tmp_path: Path, **fields: object) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", **fields}), encoding="utf-8")
    return path


def _fresh_recipe_module(monkeypatch: pytest.MonkeyPatch, module: object, name: str, cls: type) -> object:
    """soaes.pipeline.recipe imported anew after `module.name` became `cls` (restored after the test)."""
    monkeypatch.setattr(module, name, cls)
    monkeypatch.setattr(soaes.pipeline, "recipe", sys.modules["soaes.pipeline.recipe"], raising=False)
    monkeypatch.delitem(sys.modules, "soaes.pipeline.recipe")
    return importlib.import_module("soaes.pipeline.recipe")


def test_a_field_added_to_the_bench_config_is_a_recipe_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import soaes_specdec.bench as bench

    @dataclasses.dataclass
    class BenchConfigPlus(bench.BenchConfig):
        new_knob: int = dataclasses.field(default=1, metadata={"help": "A setting the package just added."})

    recipe_mod = _fresh_recipe_module(monkeypatch, bench, "BenchConfig", BenchConfigPlus)
    r = recipe_mod.read_pipeline_recipe(_recipe(tmp_path, specdec_bench={"new_knob": 7}))
    assert r.specdec_bench.new_knob == 7
    assert package_config(r.specdec_bench, BenchConfigPlus, target="t").new_knob == 7  # what the stage hands over
    assert r.specdec_bench.max_prompts == SECTION_DEFAULTS["specdec_bench"]["max_prompts"]  # the pipeline's default


def test_a_field_added_to_the_kd_config_is_a_recipe_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import soaes_distill.trainer as trainer

    @dataclasses.dataclass
    class KDConfigPlus(trainer.KDConfig):
        new_divergence_knob: float = 0.0

    recipe_mod = _fresh_recipe_module(monkeypatch, trainer, "KDConfig", KDConfigPlus)
    r = recipe_mod.read_pipeline_recipe(_recipe(tmp_path, distill_draft={"kd": {"new_divergence_knob": 0.25}}))
    assert r.distill_draft.kd.new_divergence_knob == 0.25


def test_pipeline_defaults_are_overrides_of_the_package_defaults(tmp_path: Path) -> None:
    from soaes_eval.runner import EvalRunConfig
    from soaes_specdec.bench import BenchConfig

    r = load_pipeline_recipe(_recipe(tmp_path, stages=["curate"], specdec_bench={"max_prompts": 9}))
    assert r.specdec_bench.max_prompts == 9  # the recipe over the pipeline's default
    assert r.specdec_bench.reference_dtype == "bfloat16" != BenchConfig().reference_dtype
    assert r.specdec_bench.top_p == BenchConfig().top_p  # not overridden: the package's own default
    assert r.eval.max_gen_toks == 64 != EvalRunConfig().max_gen_toks
    assert isinstance(r.specdec_bench, BenchConfig) and isinstance(r.eval, EvalRunConfig)


@pytest.mark.parametrize(("key", "value"), [("specdec_bench.target", "embedded:smollm2-135m-other"),
                                            ("eval.model", "somewhere"), ("specdec_bench.seed", "3")])
def test_a_field_the_pipeline_sets_is_refused(tmp_path: Path, key: str, value: str) -> None:
    path = _recipe(tmp_path, stages=["curate"])
    line = one_error_line(soaes_cli(), "pipeline", "plan", str(path), "--set", f"{key}={value}")
    assert line.startswith(f"error: {path}: {key}: set by the pipeline"), line


def soaes_cli() -> object:
    from soaes.cli import main

    return main


def test_plan_prints_each_stages_effective_config(tmp_path: Path) -> None:
    from click.testing import CliRunner

    path = _recipe(tmp_path, stages=["curate", "pack"], pack={"max_length": 77})
    res = CliRunner().invoke(soaes_cli(), ["pipeline", "plan", str(path), "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    pack = res.output.split("_pack ", 1)[1]
    assert "max_length: 77" in pack and "sft_stage1: sample:sft/dialog_pool.jsonl" in pack
    demo = CliRunner().invoke(soaes_cli(), ["pipeline", "plan", "demo", "-o", str(tmp_path / "demo")]).output
    bench = demo.split("_specdec_bench", 1)[1].split("_export", 1)[0]
    assert "reference_dtype: bfloat16" in bench and "methods:" in bench and "exactness_prompts: 4" in bench
    assert "target:" not in bench and "seed:" not in bench  # set by the pipeline, not by the recipe


def test_the_registry_is_the_one_list_of_stages() -> None:
    assert STAGE_ORDER == tuple(STAGES)
    assert STAGE_ORDER[:3] == ("curate", "decontaminate", "pack") and STAGE_ORDER[-1] == "report"


def _imports(path: Path, package: str) -> set[str]:
    """soaes modules `path` imports (relative imports resolved), at any depth of the file."""
    mod = package + "." + path.stem if path.stem != "__init__" else package
    pkg_parts = (mod if path.stem == "__init__" else package).split(".")
    out = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test).endswith("TYPE_CHECKING") for b in block.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.ImportFrom):
            base = pkg_parts[:len(pkg_parts) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("soaes.")}


def test_no_import_cycle_in_the_root_package() -> None:
    """Module-level and function-level imports of src/soaes form a graph without cycles (a package __init__ that
    re-exports its modules is left out: it imports them, nothing imports through it within the package)."""
    modules = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = ".".join(rel.parts[:-1])
        modules[name] = (path, package)
    graph = {name: {m for m in _imports(path, package) if m in modules and m != name}
             for name, (path, package) in modules.items() if path.name != "__init__.py"}
    graph = {k: {m for m in v if m in graph} for k, v in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(nxt):], node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])


def test_every_relative_import_names_a_module() -> None:
    """`from ..x import y` inside src/soaes resolves to a module that exists (a moved module's imports are easy to get
    one level wrong)."""
    wrong = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        package = rel.parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = SRC.parent.joinpath(*package[:len(package) - node.level + 1], *(node.module or "").split("."))
                if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
                    wrong.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {'.' * node.level}{node.module}")
    assert not wrong, wrong


def test_stage_modules_are_small_and_stage_runs_short() -> None:
    too_long = []
    for path in sorted((SRC / "pipeline" / "stages").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 250:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name == "run":
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > 40:
                    too_long.append(f"{path.name}:{node.lineno} run: {n} lines")
    assert not too_long, too_long
