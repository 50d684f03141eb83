"""Settings of the one-shot `soaes-distill` commands as dataclasses, so that each command's options, `--config`
YAML and `--set` keys come from one definition (`soaes_core.cli_options.config_options`).

Commands whose library call has its own config extend it with the run's paths (`FeatureDraftJob` is a
`FeatureKDConfig`, `DomainQueriesJob` a `DomainQueryConfig`), so a library setting gets its option with no edit here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from soaes_core import DEFAULT_MODEL
from soaes_core.placement import Placement

from .domain_queries import DomainQueryConfig
from .feature_kd import FeatureKDConfig

_DEVICE_HELP = "Device of the model(s): auto (cuda when present, else cpu), cpu, cuda or cuda:N."


@dataclass
class BlackboxConfig:
    """`soaes-distill blackbox`: the target's greedy answers to a prompt set, as SFT chat records."""

    prompts: str = field(metadata={
        "help": "JSONL with `prompt` (or chat `messages`, first user turn used) and optional `id`."})
    output: str = field(metadata={"help": "Output chat JSONL (SFT format)."})
    target: str = field(default=DEFAULT_MODEL, metadata={"help": "Target model spec."})
    max_new_tokens: int = field(default=128, metadata={"help": "Answer length cap in tokens."})
    system: str | None = field(default=None, metadata={"help": "System prompt."})
    batch_size: int = field(default=8, metadata={"help": "Prompts decoded together."})
    device: str = field(default="auto", metadata={"help": _DEVICE_HELP})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        Placement(device=self.device)


@dataclass
class MagpieConfig:
    """`soaes-distill magpie`: Magpie-style synthetic queries (pre-query template only) and the target's answers."""

    output: str = field(metadata={"help": "Output chat JSONL."})
    target: str = field(default=DEFAULT_MODEL, metadata={"help": "Target model spec."})
    num_queries: int = field(default=64, metadata={"help": "Queries to generate (before filtering)."})
    system: str | None = field(default=None, metadata={"help": "System prompt steering the domain of the queries."})
    language: Literal["any", "zh", "en"] = field(default="any", metadata={"help": "Keep queries in this language."})
    rejects: str | None = field(default=None, metadata={
        "help": "Where rejected queries go (default OUTPUT.rejects.jsonl)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    device: str = field(default="auto", metadata={"help": _DEVICE_HELP})

    def __post_init__(self) -> None:
        if self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {self.num_queries}")
        Placement(device=self.device)


@dataclass(kw_only=True)
class DomainQueriesJob(DomainQueryConfig):
    """`soaes-distill domain-queries`: the `DomainQueryConfig` plus where the prompts go and what to hold out."""

    output: str = field(metadata={"help": "Output prompts JSONL ({id, prompt, source}); drops go to "
                                          "OUTPUT.rejects.jsonl."})
    held_out: str | None = field(default=None, metadata={
        "help": "JSONL of held-out prompts (prompt or messages) that no query may overlap."})

    def query_config(self) -> DomainQueryConfig:
        """The library settings alone."""
        return DomainQueryConfig(**{f.name: getattr(self, f.name) for f in fields(DomainQueryConfig)})


@dataclass
class EstimateConfig:
    """`soaes-distill estimate`: offline acceptance of a draft against the target, teacher-forced on token data."""

    draft: str = field(metadata={"help": "Draft model spec or directory."})
    data: str = field(metadata={"help": "Tokenized JSONL/Parquet."})
    target: str = field(default=DEFAULT_MODEL, metadata={"help": "Target model spec."})
    top_p: float = field(default=0.7, metadata={"help": "Top-p of the sampled acceptance estimate."})
    batch_size: int = field(default=8, metadata={"help": "Examples per teacher-forced pass."})
    device: str = field(default="auto", metadata={"help": _DEVICE_HELP})

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        Placement(device=self.device)


@dataclass(kw_only=True)
class FeatureDraftJob(FeatureKDConfig):
    """`soaes-distill feature-draft`: the `FeatureKDConfig` plus the target, the data and the output directory."""

    train_data: str = field(metadata={"help": "Training token data (JSONL/Parquet, input_ids + labels)."})
    output_dir: str = field(metadata={"help": "Output directory (resumed if it holds a checkpoint)."})
    target: str = field(default=DEFAULT_MODEL, metadata={"help": "Target model spec."})
    dev_data: str | None = field(default=None, metadata={"help": "Dev token data (default: a split of train_data)."})
    heldout_data: str | None = field(default=None, metadata={
        "help": "Held-out token data, evaluated once at the end."})
    device: str = field(default="auto", metadata={
        "help": "Device of the target and the draft: auto (cuda when present, else cpu), cpu, cuda or cuda:N "
                "(the target runs in float32; autocast sets the training precision)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        Placement(device=self.device)

    def feature_config(self) -> FeatureKDConfig:
        """The training settings alone."""
        return FeatureKDConfig(**{f.name: getattr(self, f.name) for f in fields(FeatureKDConfig)})
