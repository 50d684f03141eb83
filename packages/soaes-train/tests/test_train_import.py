"""soaes-train as installed: its version is the distribution's and its CLI entry point works."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

import soaes_train
import soaes_train.cli
from soaes_core.testing.installed import check_installed_distribution


def test_installed_distribution_and_console_script() -> None:
    check_installed_distribution("soaes-train", soaes_train, {"run", "recipes", "estimate"})


def test_shipped_recipes_are_listed() -> None:
    # the recipe YAMLs are package data: a wheel built without them would list none
    shipped = sorted(p.stem for p in (Path(soaes_train.__file__).parent / "recipe_files").glob("*.yaml"))
    assert "tiny-qwen2-cpu" in shipped
    result = CliRunner().invoke(soaes_train.cli.main, ["recipes"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.splitlines() if line.strip() and not line.startswith("(")]
    assert sorted(listed) == shipped
