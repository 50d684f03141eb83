"""Chat templates shipped with soaes-data (for tokenizers whose template cannot be downloaded here)."""

from __future__ import annotations

from importlib import resources

from soaes_core.errors import InvalidArgumentError

TEMPLATES = {"qwen2.5": "qwen2_5.jinja"}


def chat_template(name: str) -> str:
    """The Jinja text of a shipped chat template (`"qwen2.5"`: the stock Qwen2.5-Instruct template)."""
    if name not in TEMPLATES:
        raise InvalidArgumentError(f"unknown chat template {name!r}; shipped: {', '.join(sorted(TEMPLATES))}")
    return resources.files(__name__).joinpath(TEMPLATES[name]).read_text(encoding="utf-8")
