"""Dataclass configs for one training stage and for a multi-stage recipe (loaded from YAML).

A recipe is `name`, `output_dir`, optional `defaults` (merged into every stage) and `stages`: a list of
`StageConfig` (`kind: cpt | sft`, `model`, `data`, `train`, `deepspeed`). Subclass these (e.g. soaes-distill)
by adding fields; `__post_init__` validates ranges and raises ValueError, which `soaes_core.load_config`
reports as a one-line `ConfigError` naming the file and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

AttnImplementation = Literal["auto", "flash_attention_2", "sdpa", "eager"]
SchedulerName = Literal["cosine_floor", "constant_with_warmup", "cosine", "linear", "constant"]


@dataclass
class DataConfig:
    """Where a stage's examples come from and how they are shaped into batches.

    `format`: `jsonl` (raw text for CPT / chat `messages` for SFT, tokenized at start), `packed` (a
    soaes-data packed dataset directory: Parquet shards + manifest) or `parquet` (tokenized rows with
    `input_ids` and optional `labels`). `paths` may name several files (e.g. joint stage-1+2 SFT).
    """

    paths: list[str] = field(default_factory=list)
    format: Literal["auto", "jsonl", "packed", "parquet"] = "auto"
    text_field: str = "text"
    messages_field: str = "messages"
    max_length: int = 2048
    packing: bool = True
    # over-long sequences: cut to max_length and count them, or stop with an error naming the line
    overlong: Literal["truncate", "error"] = "truncate"
    # CPT only: restart position_ids per document so packed documents never attend to each other
    separate_documents: bool = True
    max_examples: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {self.max_length}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"data.max_examples must be >= 1, got {self.max_examples}")


@dataclass
class TrainConfig:
    """Optimisation settings (mapped onto `transformers.TrainingArguments`)."""

    learning_rate: float = 1e-5
    lr_scheduler: SchedulerName = "cosine_floor"
    min_lr: float = 1e-6  # floor of `cosine_floor` (the paper: 1e-5 decayed to 1e-6)
    warmup_ratio: float = 0.05
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool | None = None  # None: bf16 when the hardware supports it (CUDA with bf16), else fp32
    gradient_checkpointing: bool = False
    attn_implementation: AttnImplementation = "auto"
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int | None = 2
    report_to: list[str] = field(default_factory=list)  # e.g. ["tensorboard"]
    dataloader_num_workers: int = 0
    verify_packing: bool = True  # check packed == unpacked logits on a few sequences before training

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"train.min_lr must be in [0, learning_rate={self.learning_rate}], got {self.min_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"train.max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO settings; `config_file` (a user JSON) replaces the generated config when set."""

    enabled: bool = False
    stage: int = 3
    offload_optimizer: bool = True
    offload_param: bool = False
    config_file: str | None = None
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int | None = None
    stage3_gather_16bit_weights_on_model_save: bool = True
    # pre-flight memory check: warn when model states will not fit (GPU per device / host RAM)
    memory_check: bool = True
    num_gpus_per_node: int | None = None  # for the estimate; None: what torch sees (1 on CPU)
    num_nodes: int = 1

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.offload_param and self.stage != 3:
            raise ValueError(f"deepspeed.offload_param needs ZeRO stage 3 (got stage {self.stage}); "
                             "use offload_optimizer with stage 2")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3 (got stage 0)")
        if self.num_nodes < 1:
            raise ValueError(f"deepspeed.num_nodes must be >= 1, got {self.num_nodes}")


@dataclass
class StageConfig:
    """One training stage. `model`: a model spec (HF dir, `embedded:smollm2-135m`, `hf:ORG/NAME`), or
    `stage:NAME` for another stage's output; None means the previous stage's output (or, for the first
    stage, the recipe's `base_model`)."""

    name: str
    kind: Literal["cpt", "sft"]
    model: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"stage name must be a plain directory name, got {self.name!r}")


@dataclass
class RecipeConfig:
    """A curriculum: stages run in order, each (by default) starting from the previous stage's output."""

    name: str
    stages: list[StageConfig]
    output_dir: str = "runs/${name}"
    base_model: str | None = None
    description: str = ""
    defaults: dict = field(default_factory=dict)  # merged into every stage before parsing (see load_recipe)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("recipe has no stages")
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate stage name(s): {', '.join(dup)}")
        self.output_dir = self.output_dir.replace("${name}", self.name)

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)
