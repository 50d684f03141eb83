"""soaes-train as installed: its version is the distribution's and its CLI entry point works."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from click.testing import CliRunner

import soaes_train
import soaes_train.cli


def test_version_is_the_installed_distributions() -> None:
    assert soaes_train.__version__ == md.version("soaes-train")


def test_console_script_runs_help_for_every_command() -> None:
    (entry,) = md.entry_points(group="console_scripts", name="soaes-train")
    main = entry.load()
    runner = CliRunner()
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and soaes_train.__version__ in version.output.split()
    assert {"run", "recipes", "estimate"} <= set(main.commands)
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, (name, result.output)


def test_shipped_recipes_are_listed() -> None:
    # the recipe YAMLs are package data: a wheel built without them would list none
    shipped = sorted(p.stem for p in (Path(soaes_train.__file__).parent / "recipe_files").glob("*.yaml"))
    assert "tiny-qwen2-cpu" in shipped
    result = CliRunner().invoke(soaes_train.cli.main, ["recipes"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.splitlines() if line.strip() and not line.startswith("(")]
    assert sorted(listed) == shipped
