"""soaes-data as installed: its version is the distribution's, its CLI entry point works, `pack` keeps its contract."""

from __future__ import annotations

import importlib.metadata as md
import inspect

from click.testing import CliRunner

import soaes_data
from soaes_data.packing import build_packed_example, pack


def test_version_is_the_installed_distributions() -> None:
    assert soaes_data.__version__ == md.version("soaes-data")


def test_console_script_runs_help_for_every_command() -> None:
    (entry,) = md.entry_points(group="console_scripts", name="soaes-data")
    main = entry.load()
    runner = CliRunner()
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and soaes_data.__version__ in version.output.split()
    assert {"curate", "pack", "split", "inspect"} <= set(main.commands)
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, (name, result.output)


def test_pack_contract() -> None:
    assert list(inspect.signature(pack).parameters) == ["lengths", "max_length"]
    lengths = [5, 3, 2, 4, 6, 1]
    bins = pack(lengths, 6)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 6 for b in bins)
    packed = build_packed_example([{"input_ids": [7, 8, 9]}, {"input_ids": [4, 5]}], [0, 1])
    assert packed["input_ids"] == [7, 8, 9, 4, 5] and packed["position_ids"] == [0, 1, 2, 0, 1]
    assert packed["labels"][3] == -100
