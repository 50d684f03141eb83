"""The shipped sample corpus (a small illustrative sample written for this project, not SOAEs-DataSuite).

`sample_dir()` is its root; `sample_path("corpus/articles.jsonl")` a file in it. Layout: `corpus/` raw
documents (JSONL articles with planted duplicates, a GB18030 text, HTML, DOCX, PDF, a Traditional-Chinese
text), `sft/dialog_pool.jsonl` (Infinity-Instruct-style, category-labelled) and `sft/expert_pool.jsonl`
(expert Q&A and reports, `task` in {qa, report}), `recipe.yaml` (the default curation recipe).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from soaes_core.errors import InvalidArgumentError


def sample_dir() -> Path:
    """Root directory of the shipped sample corpus."""
    return Path(str(resources.files(__name__)))


def sample_path(name: str) -> Path:
    """Path of a file or folder in the sample corpus (e.g. `"sft/expert_pool.jsonl"`)."""
    path = sample_dir() / name
    if not path.exists():
        raise InvalidArgumentError(f"no sample named {name!r} under {sample_dir()}")
    return path
