"""`soaes pipeline`: from a domain corpus to a faster domain model in one command (curate → pack → CPT → SFT
stage 1 → SFT stage 2 → teacher data → logit dump → draft KD → speculative-decoding bench → vLLM export → eval →
report).

Each stage is a call of a package API (`stages.py`), configured by one YAML recipe (`recipe.py`); the runner
(`runner.py`) skips up-to-date stages, commits outputs atomically and resumes after a kill.
"""

from .recipe import STAGE_ORDER, PipelineRecipe, load_pipeline_recipe, resolve_recipe_path
from .runner import RunSummary, StageEvent, StagePlan, plan_pipeline, run_pipeline, select_stages
from .stages import STAGES, Stage, stage_dirname

__all__ = ["STAGES", "STAGE_ORDER", "PipelineRecipe", "RunSummary", "Stage", "StageEvent", "StagePlan",
           "load_pipeline_recipe", "plan_pipeline", "resolve_recipe_path", "run_pipeline", "select_stages",
           "stage_dirname"]
