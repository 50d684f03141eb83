"""Options and --set generated from a config dataclass: help and defaults from its fields, one `error:` line each."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import click
import pytest
from click.testing import CliRunner

from soaes_core.cli_options import KeysHelpCommand, config_options, parse_set_pairs, parse_value
from soaes_core.clitools import SoaesGroup
from soaes_core.errors import ConfigError


@dataclass
class Inner:
    beta: float = field(default=0.9, metadata={"help": "Decay of the moving average."})


@dataclass
class ToolConfig:
    model: str = field(default="tiny", metadata={"help": "Which model to load."})
    sizes: list[int] = field(default_factory=lambda: [1, 3], metadata={"help": "Block sizes to try."})
    mode: Literal["fast", "exact"] = field(default="exact", metadata={"help": "Speed or exactness."})
    limit: int | None = field(default=None, metadata={"help": "At most N items; unset = all."})
    sample: bool = field(default=False, metadata={"help": "Sample instead of argmax."})
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


def make_cli(cls: type, **kwargs: Any) -> click.Group:
    """A SoaesGroup with one command `go` that prints the config it was given."""

    @click.group(cls=SoaesGroup)
    def cli() -> None:
        pass

    @cli.command()
    @config_options(cls, **kwargs)
    def go(config: Any) -> None:
        click.echo(repr(config))

    return cli


def invoke(cli: click.Group, *args: str) -> Any:
    return CliRunner().invoke(cli, ["go", *args])


def test_every_field_gets_an_option_with_its_help_and_default() -> None:
    out = invoke(make_cli(ToolConfig), "--help").output
    for text in ("--model", "Which model to load. (default: tiny)", "--sizes", "(default: 1,3)",
                 "--mode", "--limit", "(default: none)", "--sample / --no-sample", "--set KEY=VALUE", "--config"):
        assert text in " ".join(out.split()), text
    assert "--inner" not in out  # a nested config is reached through --set


def test_options_are_converted_by_field_type() -> None:
    res = invoke(make_cli(ToolConfig), "--model", "m2", "--sizes", "2,4,8", "--mode", "fast", "--limit", "5",
                 "--sample", "--set", "inner.beta=0.5")
    assert res.exit_code == 0, res.output
    assert res.output.strip() == repr(ToolConfig(model="m2", sizes=[2, 4, 8], mode="fast", limit=5, sample=True,
                                                 inner=Inner(beta=0.5)))
    assert invoke(make_cli(ToolConfig)).output.strip() == repr(ToolConfig())  # nothing given: the defaults


@pytest.mark.parametrize(("args", "message"), [
    (["--sizes", "3,abc"], "error: --sizes[1]: expected int, got str 'abc'"),
    (["--sizes", "3,,4"], "error: --sizes: empty item in comma-separated list '3,,4'"),
    (["--mode", "quick"], "error: --mode: expected one of 'fast', 'exact', got 'quick'"),
    (["--limit", "0"], "error: command line: limit must be >= 1, got 0"),
    (["--set", "inner.betta=1"], "error: --set inner.betta: unknown key (did you mean 'inner.beta'?)"),
    (["--set", "inner.beta=high"], "error: --set inner.beta: expected float, got str 'high'"),
    (["--set", "model"], "error: --set: expected KEY=VALUE, got 'model'"),
])
def test_bad_values_are_one_error_line_naming_the_option(args: list[str], message: str) -> None:
    res = invoke(make_cli(ToolConfig), *args)
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [message]


def test_config_file_then_options(tmp_path: Path) -> None:
    p = tmp_path / "tool.yaml"
    p.write_text("model: from-file\nsizes: [5]\ninner: {beta: 0.1}\n", encoding="utf-8")
    res = invoke(make_cli(ToolConfig), "--config", str(p), "--sizes", "7")
    assert res.exit_code == 0, res.output
    assert res.output.strip() == repr(ToolConfig(model="from-file", sizes=[7], inner=Inner(beta=0.1)))
    p.write_text("modell: x\n", encoding="utf-8")
    res = invoke(make_cli(ToolConfig), "--config", str(p))
    assert res.exit_code == 2 and f"error: {p}: modell: unknown key (did you mean 'model'?)" in res.output


def test_option_names_can_be_kept() -> None:
    cli = make_cli(ToolConfig, names={"sizes": ("-n", "--num-sizes"), "sample": ("--sample/--greedy",)})
    res = invoke(cli, "-n", "4", "--sample")
    assert res.exit_code == 0 and "sizes=[4]" in res.output and "sample=True" in res.output
    assert "--greedy" in invoke(cli, "--help").output
    assert invoke(cli, "-n", "x").output.strip() == "error: --num-sizes[0]: expected int, got str 'x'"


def test_a_field_added_to_the_dataclass_appears_in_help_and_set() -> None:
    """Acceptance: adding a field is the only edit needed for it to reach --help, its option and --set."""

    @dataclass
    class Extended(ToolConfig):
        warmup: int = field(default=2, metadata={"help": "Warm-up passes before timing."})

    cli = make_cli(Extended)
    assert "--warmup INT Warm-up passes before timing. (default: 2)" in " ".join(invoke(cli, "--help").output.split())
    assert "warmup=9" in invoke(cli, "--warmup", "9").output
    assert "warmup=4" in invoke(cli, "--set", "warmup=4").output
    assert "--warmup" not in invoke(make_cli(ToolConfig), "--help").output


def test_keys_help_lists_nested_keys_lazily() -> None:
    calls = []

    def sections() -> list[tuple[str, type, str, tuple[str, ...]]]:
        calls.append(1)
        return [("Keys", ToolConfig, "", ("model",))]

    @click.command(cls=KeysHelpCommand, set_keys=sections)
    def cmd() -> None:
        pass

    assert not calls  # nothing is imported or listed until help is shown
    out = CliRunner().invoke(cmd, ["--help"]).output
    assert "inner.beta" in out and "float, default 0.9: Decay of the moving average" in out
    assert "  model " not in out and calls == [1]


def test_parse_value_rules() -> None:
    assert parse_value("1,2", list[int], "--x") == [1, 2]
    assert parse_value("[1, 2]", list[int], "--x") == [1, 2]
    assert parse_value("null", int | None, "--x") is None
    assert parse_value("null", str | None, "--x") == "null"  # a string field keeps the text as typed
    assert parse_value("007", str, "--x") == "007"
    assert parse_value("true", bool, "--x") is True
    assert parse_value("1e-5", float, "--x") == 1e-5
    with pytest.raises(ConfigError, match=r"^--x: expected bool \(true/false\), got str 'maybe'$"):
        parse_value("maybe", bool, "--x")
    assert parse_set_pairs(["a.b=1", "c= x=y"]) == {"a.b": "1", "c": " x=y"}  # no dataclass: values stay text
    assert parse_set_pairs(["sizes=1,2", "inner.beta=0.5"], ToolConfig) == {"sizes": [1, 2], "inner.beta": 0.5}


def test_recipe_argument_stands_for_config_and_refuses_both(tmp_path: Any) -> None:
    """A positional RECIPE.yaml is the `--config` file; giving both is one ConfigError line."""
    from soaes_core.cli_options import recipe_argument

    seen = []

    @click.command()
    @click.option("--config", "config_path", default=None)
    @recipe_argument
    def cmd(config_path: str | None) -> None:
        seen.append(config_path)

    recipe = tmp_path / "r.yaml"
    recipe.write_text("a: 1\n", encoding="utf-8")
    assert CliRunner().invoke(cmd, [str(recipe)]).exit_code == 0
    assert CliRunner().invoke(cmd, ["--config", "other.yaml"]).exit_code == 0
    assert seen == [str(recipe), "other.yaml"]
    result = CliRunner().invoke(cmd, [str(recipe), "--config", "other.yaml"])
    assert isinstance(result.exception, ConfigError) and "give the recipe once" in str(result.exception)
