"""`soaes pipeline`: from a domain corpus to a faster domain model in one command (curate → pack → CPT → SFT
stage 1 → SFT stage 2 → teacher data → logit dump → draft KD → speculative-decoding bench → vLLM export → eval →
report).

Each stage is a call of a package API (`stages/`, one module per concern), configured by one YAML recipe whose
sections are the packages' configs (`recipe.py`, checked by `checks.py`); the runner (`runner.py`) skips up-to-date
stages, commits outputs atomically and resumes after a kill.
"""

from importlib import import_module
from typing import Any

# public name → submodule; imported on first use, so that `soaes --help` does not import every package
_EXPORTS = {"load_pipeline_recipe": "checks", "PipelineRecipe": "recipe", "resolve_recipe_path": "recipe",
            "RunSummary": "runner", "StageEvent": "runner", "StagePlan": "runner", "plan_pipeline": "runner",
            "run_pipeline": "runner", "select_stages": "runner", "STAGE_ORDER": "stages", "STAGES": "stages",
            "Stage": "stages", "stage_dirname": "stages"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
