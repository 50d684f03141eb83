"""soaes-train: Continual pre-training and domain-progressive SFT on transformers + DeepSpeed ZeRO-3.

Public modules: `config` (StageConfig, RecipeConfig, ...), `schedules`, `collator` (PackedCollator,
PaddedCollator), `attention`, `data`, `deepspeed_setup`, `trainer` (SoaesTrainer, train_stage),
`curriculum` (load_recipe, run_recipe), `recipes`.
"""

__version__ = "0.1.0"
