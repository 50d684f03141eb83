"""Checks every soaes package's tests run on itself as installed: version metadata and its console script."""

from __future__ import annotations

import importlib.metadata as md
from types import ModuleType


def check_installed_distribution(dist: str, module: ModuleType, commands: set[str]) -> None:
    """Assert `module.__version__` is the installed `dist`'s version, and that `dist`'s console script (named like
    the distribution) answers `--version` and runs `--help` of every command, including `commands`."""
    from click.testing import CliRunner

    assert module.__version__ == md.version(dist)
    (entry,) = md.entry_points(group="console_scripts", name=dist)
    main = entry.load()
    runner = CliRunner()
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and module.__version__ in version.output.split(), version.output
    assert commands <= set(main.commands), sorted(main.commands)
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, (name, result.output)
