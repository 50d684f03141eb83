"""A stage's effective config, as `soaes pipeline plan` prints it: the package config its section is (defaults,
the pipeline's `SECTION_DEFAULTS`, the recipe, `quick:` and `--set` applied), minus what the pipeline sets itself."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from soaes_core import to_dict

from .recipe import PipelineRecipe


def effective_config(recipe: PipelineRecipe, stage: str) -> str:
    """`key: value` lines (nested keys dotted, as `--set` takes them) of stage `stage`'s section; empty for a stage
    without one. Fields the pipeline sets itself are left out."""
    section = getattr(recipe, stage, None)
    if section is None or not dataclasses.is_dataclass(section):
        return ""
    owned = set(getattr(section, "PIPELINE_SETS", {}))
    data = {k: v for k, v in to_dict(section).items() if k not in owned}
    return "\n".join(f"{key}: {_flow(value)}" for key, value in _leaves(data))


def _leaves(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()
