"""soaes-train: Continual pre-training and domain-progressive SFT on transformers + DeepSpeed ZeRO-3.

Public modules: `config` (StageConfig, TrainRecipe, ...), `schedules`, `collator` (PackedCollator,
PaddedCollator), `attention`, `data`, `deepspeed_setup`, `trainer` (SoaesTrainer, train_stage),
`stage_runner` (TrainRecipe → load_train_recipe, run_train_recipe), `recipes`.
"""

__version__ = "0.2.0"
