"""Every ```python block of the root README and of each package README runs.

Each block runs as written in a fresh temporary working directory, after a small per-block setup that creates
what the surrounding README text says exists (a packed dataset made by `soaes-data pack`, a config file, a
benchmark folder, the tensors a loss example takes). Placeholder paths outside the working directory are
pointed into it. Blocks are named by a line unique to them (not by position, so blocks can be added or moved);
a new README block without an entry here fails `test_every_readme_block_is_covered`.
"""

from __future__ import annotations

import csv
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", *sorted(ROOT.glob("packages/*/README.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_UNDO: list[Callable[[], None]] = []  # clean-ups a setup registers (run after the block, pass or fail)


def python_blocks(readme: Path) -> list[str]:
    return _BLOCK.findall(readme.read_text(encoding="utf-8"))


def _core_setup(tmp: Path) -> dict[str, Any]:
    (tmp / "train.yaml").write_text("lr: 2.0e-5\n", encoding="utf-8")
    return {}


def _data_packed_setup(tmp: Path) -> dict[str, Any]:
    from click.testing import CliRunner

    from soaes_data.cli import main
    from soaes_data.samples import sample_path

    res = CliRunner().invoke(main, ["pack", str(sample_path("sft/expert_pool.jsonl")), "-o", "runs/sft-packed",
                                    "--max-length", "1024"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return {}


def _data_decontam_setup(tmp: Path) -> dict[str, Any]:
    bench = tmp / "bench" / "cmmlu" / "test"  # a CMMLU-layout release folder with one subject
    bench.mkdir(parents=True)
    question = "国有资产监督管理委员会代表国务院履行出资人职责的范围是什么"
    with open(bench / "law.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
        w.writerow([0, question, "中央企业", "地方企业", "外资企业", "民营企业", "A"])
    return {"docs": [{"id": "hit", "text": "材料：" + question + "。"},
                     {"id": "clean", "text": "今天天气很好，适合出门散步。"}]}


def _distill_setup(tmp: Path) -> dict[str, Any]:
    import torch

    from soaes_data.packing import IGNORE_INDEX

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 128, (2, 6), generator=g)
    labels[:, 0] = IGNORE_INDEX
    return {"student_logits": torch.randn(2, 6, 128, generator=g),
            "teacher_logits": torch.randn(2, 6, 128, generator=g), "labels": labels}


@dataclass
class Case:
    readme: str
    marker: str  # a string found in exactly one python block of the README
    slow: bool = True  # needs the embedded model
    setup: Callable[[Path], dict[str, Any]] = lambda tmp: {}
    replace: dict[str, str] = field(default_factory=dict)  # placeholder -> path inside the working directory
    check: Callable[[dict[str, Any], Path], None] = lambda ns, tmp: None  # what the block must have produced


def _check_core(ns: dict[str, Any], tmp: Path) -> None:
    assert ns["cfg"].lr == 2.0e-5 and (tmp / "out" / "manifest.json").is_file()


def _check_decontam(ns: dict[str, Any], tmp: Path) -> None:
    assert (ns["report"].checked, ns["report"].contaminated) == (2, 1)


def _check_distill(ns: dict[str, Any], tmp: Path) -> None:
    import torch

    assert ns["loss"].ndim == 0 and bool(torch.isfinite(ns["loss"]))


def _check_specdec(ns: dict[str, Any], tmp: Path) -> None:
    assert ns["out"].stats.proposed > 0 and len(ns["out"].new_tokens()) > 0


def _data_step_setup(tmp: Path) -> dict[str, Any]:
    from soaes_data.steps import STAGE_REGISTRY

    saved = dict(STAGE_REGISTRY)  # the block registers a stage in the real registry: restore it afterwards

    def restore() -> None:
        STAGE_REGISTRY.clear()
        STAGE_REGISTRY.update(saved)

    _UNDO.append(restore)
    return {}


def _check_data_step(ns: dict[str, Any], tmp: Path) -> None:
    from types import SimpleNamespace

    from soaes_data.steps import STAGE_REGISTRY

    step = STAGE_REGISTRY["min_cjk"](0, None, str(tmp))
    assert step.process(SimpleNamespace(text="国有资产")) is None
    assert step.process(SimpleNamespace(text="no match")) == "min_cjk:none"


def _check_train(ns: dict[str, Any], tmp: Path) -> None:
    assert [r.name for r in ns["run_train_recipe"](ns["recipe"])] == [s.name for s in ns["recipe"].stages]
    assert all((tmp / "runs" / "tiny" / s.name / "model").is_dir() for s in ns["recipe"].stages)


CASES = [
    Case("README.md", '"What is SASAC?"'),
    Case("packages/soaes-core/README.md", "load_config(", setup=_core_setup, check=_check_core),
    Case("packages/soaes-data/README.md", "read_packed_dataset(", setup=_data_packed_setup),
    Case("packages/soaes-data/README.md", "class MinCjkStep", slow=False, setup=_data_step_setup,
         check=_check_data_step),
    Case("packages/soaes-data/README.md", "NgramIndex.from_config(", slow=False, setup=_data_decontam_setup,
         replace={"/data/bench": "bench"}, check=_check_decontam),
    Case("packages/soaes-distill/README.md", "distillation_loss(", slow=False, setup=_distill_setup,
         check=_check_distill),
    Case("packages/soaes-specdec/README.md", "SpeculativeDecoder(", check=_check_specdec),
    Case("packages/soaes-train/README.md", "run_train_recipe(", replace={"/tmp/tiny": "runs/tiny"},
         check=_check_train),
]


def _block(case: Case) -> str:
    matches = [b for b in python_blocks(ROOT / case.readme) if case.marker in b]
    assert len(matches) == 1, f"{case.readme}: {len(matches)} python blocks contain {case.marker!r} (want 1)"
    return matches[0]


def test_every_readme_block_is_covered() -> None:
    covered = {(c.readme, _block(c)) for c in CASES}
    found = {(str(r.relative_to(ROOT)), b) for r in READMES for b in python_blocks(r)}
    missing = [f"{readme}: {block.splitlines()[0]}" for readme, block in found - covered]
    assert not missing, f"README python blocks without a case in {Path(__file__).name}: {missing}"


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.readme}:{c.marker}",
                                               marks=[pytest.mark.slow] if c.slow else []) for c in CASES])
def test_readme_block_runs(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> None:
    code = _block(case)
    for placeholder, local in case.replace.items():
        assert placeholder in code, f"{case.readme} ({case.marker}) no longer mentions {placeholder}"
        code = code.replace(placeholder, local)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models on a shared box: extra threads only spin
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("readme_example")  # a real module, so dataclasses defined in the block resolve
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        module.__dict__.update(case.setup(tmp_path))
        exec(compile(code, f"{case.readme}:{case.marker}", "exec"), module.__dict__)
        capsys.readouterr()
        case.check(module.__dict__, tmp_path)
    finally:
        while _UNDO:
            _UNDO.pop()()
