"""YAML → dataclass loading: every problem is one ConfigError naming the file and the field path."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from soaes_core import config
from soaes_core.config import dump_config, from_dict, load_config
from soaes_core.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-5
    schedule: Literal["cosine", "constant"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Stage:
    name: str
    steps: int = 10


@dataclass
class Recipe:
    model: str
    optim: Optim = field(default_factory=Optim)
    stages: list[Stage] = field(default_factory=list)
    output: Path | None = None
    tags: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: must not be empty")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_loads_nested_values(tmp_path: Path) -> None:
    p = write(tmp_path, "model: m\noptim: {lr: 2.0e-5, schedule: constant, betas: [0.8, 0.9]}\n"
                        "stages: [{name: a}, {name: b, steps: 3}]\noutput: out/dir\ntags: {x: 1}\n")
    cfg = load_config(p, Recipe)
    assert cfg.optim == Optim(lr=2e-5, schedule="constant", betas=(0.8, 0.9))
    assert [s.steps for s in cfg.stages] == [10, 3]
    assert cfg.output == Path("out/dir")
    assert from_dict(Recipe, __import__("yaml").safe_load(dump_config(cfg))) == cfg


def test_unknown_key_has_did_you_mean_and_file(tmp_path: Path) -> None:
    p = write(tmp_path, "model: m\noptim: {lrr: 1.0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, Recipe)
    msg = str(err.value)
    assert msg.startswith(str(p)) and "optim.lrr" in msg and "did you mean 'lr'" in msg
    assert "\n" not in msg


def test_wrong_type_names_field_and_value(tmp_path: Path) -> None:
    p = write(tmp_path, "model: m\nstages: [{name: a}, {name: b, steps: many}]\n")
    with pytest.raises(ConfigError, match=r"stages\[1\]\.steps: expected int, got str 'many'"):
        load_config(p, Recipe)


def test_bool_is_not_an_int_and_literal_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"steps: expected int, got bool"):
        from_dict(Recipe, {"model": "m", "stages": [{"name": "a", "steps": True}]}, source="x.yaml")
    with pytest.raises(ConfigError, match=r"optim.schedule: .*did you mean 'cosine'"):
        from_dict(Recipe, {"model": "m", "optim": {"schedule": "cosin"}}, source="x.yaml")


def test_missing_required_and_post_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x.yaml: stages\[0\].name: missing required field"):
        from_dict(Recipe, {"model": "m", "stages": [{}]}, source="x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: model: must not be empty"):
        from_dict(Recipe, {"model": ""}, source="x.yaml")


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    p = write(tmp_path, "model: m\noptim: {lr: [\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: invalid YAML"):
        load_config(p, Recipe)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml", Recipe)


def test_overrides_apply_dotted_keys(tmp_path: Path) -> None:
    p = write(tmp_path, "model: m\n")
    cfg = load_config(p, Recipe, overrides={"optim.lr": "3e-6", "model": "other"})
    assert cfg.optim.lr == pytest.approx(3e-6) and cfg.model == "other"


@dataclass
class Relevance:
    lexicon: list[str] = field(default_factory=list)


@dataclass
class Curation:
    relevance: Relevance = field(default_factory=Relevance)


def _laughs(levels: int) -> str:
    """A 'billion laughs' YAML: each list holds nine aliases of the one before (9**levels strings when expanded)."""
    lines = ["relevance:", "  lexicon:", "    - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_fast(tmp_path: Path) -> None:
    """Issue 15 defect 2: a ~450-byte YAML of nested aliases took GBs and a minute before failing."""
    p = tmp_path / "curate.yaml"
    p.write_text(_laughs(9), encoding="utf-8")
    assert p.stat().st_size < 600
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}: YAML expands to more than"):
        load_config(p, Curation)
    assert time.perf_counter() - start < 2.0


def test_recursive_alias_and_oversized_file_are_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "model: &m [1, *m]\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: YAML has a recursive alias"):
        load_config(p, Recipe)
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(config.MAX_CONFIG_BYTES + 1)
    with pytest.raises(ConfigError, match=r"big.yaml: config file is \d+ bytes, more than the \d+ allowed"):
        load_config(big, Recipe)


def test_small_aliases_still_load(tmp_path: Path) -> None:
    p = write(tmp_path, "model: m\nstages: [&s {name: a, steps: 2}, *s]\ntags: &t {x: 1}\n")
    cfg = load_config(p, Recipe)
    assert [s.steps for s in cfg.stages] == [2, 2] and cfg.tags == {"x": 1}


def test_error_message_is_bounded_whatever_the_value() -> None:
    """The type error on a huge shared nested value is described in bounded time and length (no full repr)."""
    value: list[Any] = ["lol"] * 9
    for _ in range(8):
        value = [value] * 9  # 9**9 strings if printed in full
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        from_dict(Curation, {"relevance": {"lexicon": value}}, source="c.yaml")
    assert time.perf_counter() - start < 2.0
    message = str(err.value)
    assert message.startswith("c.yaml: relevance.lexicon[0]: expected str, got list [[") and len(message) < 150
