"""Dataclass configs for one training stage and for a multi-stage recipe (loaded from YAML).

A recipe is `name`, `output_dir`, optional `defaults` (merged into every stage) and `stages`: a list of
`StageConfig` (`kind: cpt | sft`, `model`, `data`, `train`, `deepspeed`). Reuse them elsewhere (soaes-distill's
recipe embeds `TrainConfig` and `DeepSpeedConfig`) or subclass them by adding fields; `__post_init__` validates
ranges and raises ValueError, which `soaes_core.load_config` reports as a one-line `ConfigError` naming the file
and field.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, Literal, get_type_hints

from soaes_core.config import OMIT_IF_DEFAULT

AttnImplementation = Literal["auto", "flash_attention_2", "sdpa", "eager"]
SchedulerName = Literal["cosine_floor", "constant_with_warmup", "cosine", "linear", "constant"]


@dataclass
class DataConfig:
    """Where a stage's examples come from and how they are shaped into batches.

    `format`: `jsonl` (raw text for CPT / chat `messages` for SFT, tokenized at start), `packed` (a
    soaes-data packed dataset directory: Parquet shards + manifest) or `parquet` (tokenized rows with
    `input_ids` and optional `labels`). `paths` may name several files (e.g. joint stage-1+2 SFT).
    """

    paths: list[str] = field(default_factory=list, metadata={
        "help": "Input files or directories (several: e.g. joint stage-1+2 SFT); sample:NAME for bundled data."})
    format: Literal["auto", "jsonl", "packed", "parquet"] = field(default="auto", metadata={
        "help": "jsonl (text or chat messages), packed (a soaes-data packed dataset) or parquet (tokenized rows)."})
    text_field: str = field(default="text", metadata={"help": "JSONL field holding CPT text."})
    messages_field: str = field(default="messages", metadata={"help": "JSONL field holding SFT chat messages."})
    max_length: int = field(default=2048, metadata={"help": "Tokens per training sequence."})
    packing: bool = field(default=True, metadata={"help": "Pack several examples into each sequence."})
    overlong: Literal["truncate", "error"] = field(default="truncate", metadata={
        "help": "Over-long sequences: cut to max_length and count them, or stop with an error naming the line."})
    separate_documents: bool = field(default=True, metadata={
        "help": "CPT: restart position_ids per document so packed documents never attend to each other."})
    max_examples: int | None = field(default=None, metadata={"help": "Use only the first N examples; unset = all."})

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {self.max_length}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"data.max_examples must be >= 1, got {self.max_examples}")


@dataclass
class _TrainSettings:
    """The optimisation settings soaes interprets itself; `TrainConfig` adds the other `TrainingArguments` fields."""

    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate."})
    lr_scheduler: SchedulerName = field(default="cosine_floor", metadata={
        "help": "Learning-rate schedule; cosine_floor decays to min_lr (the paper: 1e-5 to 1e-6)."})
    min_lr: float = field(default=1e-6, metadata={"help": "Floor of the cosine_floor schedule."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of the steps spent warming up."})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision; unset = when the hardware supports it (CUDA with bf16), else fp32."})
    attn_implementation: AttnImplementation = field(default="auto", metadata={
        "help": "Attention kernel; auto = flash_attention_2 when flash-attn and CUDA are present, else sdpa."})
    verify_packing: bool = field(default=True, metadata={
        "help": "Check packed == unpacked logits on a few sequences before training."})

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
        max_steps = self.max_steps  # type: ignore[attr-defined]  # a TrainingArguments field of TrainConfig
        if max_steps == 0 or max_steps < -1:
            raise ValueError(f"train.max_steps must be -1 (use epochs) or >= 1, got {max_steps}")


# TrainingArguments fields that `build_training_arguments` sets from the run (paths, DeepSpeed, device, the schedule
# above) or that must not be written into manifests (the hub token): a recipe cannot set them.
RUN_OWNED_ARGS = frozenset({
    "output_dir", "deepspeed", "use_cpu", "ddp_backend", "disable_tqdm", "remove_unused_columns", "lr_scheduler_type",
    "lr_scheduler_kwargs", "warmup_steps", "gradient_checkpointing_kwargs", "local_rank", "resume_from_checkpoint",
    "do_train", "do_eval", "do_predict", "hub_token"})
# soaes defaults where they differ from transformers' (the paper's betas; small runs log and save often)
TRAINING_ARGS_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 1, "num_train_epochs": 1.0, "adam_beta2": 0.95, "logging_steps": 1,
    "save_steps": 50, "save_total_limit": 2, "report_to": []}


def _training_argument_fields(arguments: type | None = None) -> list[tuple[str, Any, Any]]:
    """Every other field of `arguments` (`TrainingArguments`), with its type, default and help: a new transformers
    argument can be set in a recipe without a code change. Left out of dumps while at their default."""
    if arguments is None:
        from transformers import TrainingArguments as arguments

    hints = get_type_hints(arguments)
    own = {f.name for f in fields(_TrainSettings)}
    out = []
    for f in fields(arguments):
        if not f.init or f.name in own or f.name in RUN_OWNED_ARGS:
            continue
        metadata = {**f.metadata, OMIT_IF_DEFAULT: True}
        if f.name in TRAINING_ARGS_DEFAULTS:
            value = TRAINING_ARGS_DEFAULTS[f.name]
            spec = (field(default_factory=functools.partial(copy.copy, value), metadata=metadata)
                    if isinstance(value, (list, dict)) else field(default=value, metadata=metadata))
        elif f.default_factory is not MISSING:
            spec = field(default_factory=f.default_factory, metadata=metadata)
        else:
            spec = field(default=f.default, metadata=metadata)
        out.append((f.name, hints[f.name], spec))
    return out


TrainConfig = make_dataclass("TrainConfig", _training_argument_fields(), bases=(_TrainSettings,),
                             namespace={"__module__": __name__})
TrainConfig.__doc__ = """Optimisation settings: the soaes ones (schedule, precision policy, attention, packing
check) and every `transformers.TrainingArguments` field not set by the run (`RUN_OWNED_ARGS`), under the same name,
type and help, with soaes defaults in `TRAINING_ARGS_DEFAULTS`. `build_training_arguments` passes them through."""


def training_arguments_fields(train: _TrainSettings) -> dict[str, Any]:
    """The `TrainingArguments` fields that `train` holds (all but the soaes settings), by name."""
    own = {f.name for f in fields(_TrainSettings)}
    return {f.name: getattr(train, f.name) for f in fields(train) if f.name not in own}


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO settings; `config_file` (a user JSON) replaces the generated config when set."""

    enabled: bool = field(default=False, metadata={"help": "Train under DeepSpeed ZeRO."})
    stage: int = field(default=3, metadata={"help": "ZeRO stage: 0, 1, 2 or 3."})
    offload_optimizer: bool = field(default=True, metadata={"help": "Keep optimizer states in host memory."})
    offload_param: bool = field(default=False, metadata={"help": "Keep parameters in host memory (ZeRO-3 only)."})
    config_file: str | None = field(default=None, metadata={
        "help": "A DeepSpeed JSON that replaces the generated config."})
    overlap_comm: bool = field(default=False, metadata={"help": "Overlap gradient reduction with the backward pass."})
    contiguous_gradients: bool = field(default=True, metadata={"help": "Copy gradients into one contiguous buffer."})
    reduce_bucket_size: int | None = field(default=None, metadata={
        "help": "Elements reduced at a time; unset = DeepSpeed's auto."})
    stage3_gather_16bit_weights_on_model_save: bool = field(default=True, metadata={
        "help": "ZeRO-3: gather the full 16-bit weights when saving the model."})
    memory_check: bool = field(default=True, metadata={
        "help": "Pre-flight check: warn when model states will not fit (GPU per device / host RAM)."})
    num_gpus_per_node: int | None = field(default=None, metadata={
        "help": "GPUs per node for the memory estimate; unset = what torch sees (1 on CPU)."})
    num_nodes: int = field(default=1, metadata={"help": "Nodes, for the memory estimate."})

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
    model: str | None = field(default=None, metadata={
        "help": "Model spec or stage:NAME; unset = the previous stage's output (first stage: base_model)."})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    description: str = field(default="", metadata={"help": "Free text about the stage."})

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"stage name must be a plain directory name, got {self.name!r}")


@dataclass
class StageJob:
    """One stage to train outside a recipe (`soaes-train stage`, and what `soaes_train.launch` hands a launcher):
    its config, the model it starts from and the folder it writes (`model/`, `checkpoints/`)."""

    stage: StageConfig
    model: str = field(metadata={"help": "Model spec the stage starts from (an HF dir, embedded:NAME, hf:ORG/NAME)."})
    stage_dir: str = field(metadata={
        "help": "Folder the stage writes: model/ (+ manifest.json) and checkpoints/ (resumed from when present)."})
    parent: dict = field(default_factory=dict, metadata={
        "help": "Where the model came from, recorded in the manifest's parent_model."})


@dataclass
class RecipeRunOptions:
    """Which stages of a recipe `soaes-train run` trains, where, and whether finished ones are retrained."""

    stages: list[str] = field(default_factory=list, metadata={
        "help": "Run only these stages (comma-separated); the others are not touched. Empty = every stage."})
    output_dir: str | None = field(default=None, metadata={"help": "Override the recipe's output_dir."})
    force: bool = field(default=False, metadata={
        "help": "Retrain stages even if finished (discards their checkpoints)."})


@dataclass
class TrainRecipe:
    """A training recipe: stages run in order (`stage_runner`), each (by default) starting from the previous
    stage's output."""

    name: str
    stages: list[StageConfig]
    output_dir: str = field(default="runs/${name}", metadata={"help": "Where each stage's outputs go."})
    base_model: str | None = field(default=None, metadata={"help": "Model the first stage starts from."})
    description: str = field(default="", metadata={"help": "Free text, shown by `soaes-train recipes`."})
    defaults: dict = field(default_factory=dict)  # merged into every stage before parsing (see load_train_recipe)

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
