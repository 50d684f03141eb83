"""Settings of the one-shot `soaes-data` commands as dataclasses, so that each command's options, `--config` YAML
and `--set` keys come from one definition (`soaes_core.cli_options.config_options`).

Commands whose library call has its own config extend it with the run's paths and switches (`CurateJob` is a
`CurationConfig`, `SplitJob` a `SplitConfig`, ...), so a library setting gets its option with no edit here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from .curriculum import CurriculumConfig
from .decontam import DecontamConfig
from .pipeline import CurationConfig
from .split import SplitConfig
from .synth import SynthConfig

DEFAULT_MODEL = "embedded:smollm2-135m"  # soaes_core.DEFAULT_MODEL, named here without importing torch for --help
_TOKENIZER_HELP = "Tokenizer spec (HF dir, gguf:PATH or embedded:smollm2-135m)."
_TEMPLATE_HELP = "Chat template: a shipped name (qwen2.5) or a Jinja file; unset = the tokenizer's own."


@dataclass(kw_only=True)
class CurateJob(CurationConfig):
    """`soaes-data curate`: the curation recipe (`CurationConfig`) plus whether to redo unchanged stages."""

    force: bool = field(default=False, metadata={"help": "Re-run every stage even if unchanged."})

    def curation_config(self) -> CurationConfig:
        """The recipe alone (what the stages' fingerprints and the manifest record)."""
        return CurationConfig(**{f.name: getattr(self, f.name) for f in fields(CurationConfig)})


@dataclass
class PackJob:
    """`soaes-data pack`: tokenize once and pack SFT chat JSONL or a CPT corpus into Parquet shards."""

    output_dir: str = field(metadata={"help": "Packed dataset folder to write (replaced as a whole)."})
    mode: Literal["sft", "cpt"] = field(default="sft", metadata={
        "help": "sft: one chat JSONL with loss masks; cpt: documents cut into windows."})
    tokenizer: str = field(default=DEFAULT_MODEL, metadata={"help": _TOKENIZER_HELP})
    chat_template: str | None = field(default=None, metadata={"help": _TEMPLATE_HELP})
    max_length: int = field(default=8192, metadata={"help": "Tokens per packed row (>= 1)."})
    overlong: Literal["drop", "truncate", "error"] | None = field(default=None, metadata={
        "help": "SFT: a conversation longer than max_length is dropped (default; reason in rejects.jsonl), "
                "truncated (counted in the manifest) or an error."})
    packed: bool = field(default=True, metadata={"help": "SFT: FFD packing, or one example per row."})
    join_documents: bool = field(default=False, metadata={
        "help": "CPT: let documents in a window attend to each other."})
    on_error: Literal["raise", "skip"] = field(default="raise", metadata={
        "help": "A bad record: stop, or skip it (reason in rejects.jsonl)."})
    field: str | None = field(default=None, metadata={
        "help": "Messages field (sft, default messages) or text field (cpt, default text)."})

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.mode == "cpt" and self.overlong is not None:
            raise ValueError("overlong applies to sft mode (cpt cuts documents into max_length windows)")


@dataclass(kw_only=True)
class SplitJob(SplitConfig):
    """`soaes-data split`: the `SplitConfig` plus where train/dev/test.jsonl go."""

    output_dir: str = field(metadata={"help": "Folder for train/dev/test.jsonl, rejects.jsonl and the manifest."})

    def split_config(self) -> SplitConfig:
        """The library settings alone."""
        return SplitConfig(self.train, self.dev, self.test, self.seed, self.stratify_field,
                           self.near_duplicate_threshold, self.ngram)


@dataclass(kw_only=True)
class CurriculumJob(CurriculumConfig):
    """`soaes-data curriculum`: the `CurriculumConfig` plus where stage1/stage2.jsonl go."""

    output_dir: str = field(metadata={
        "help": "Folder for stage1/stage2.jsonl, rejects.jsonl, relevance_hist.png and the manifest."})


@dataclass
class InspectJob:
    """`soaes-data inspect`: which example to show, decoded with which tokenizer and chat template."""

    tokenizer: str = field(default=DEFAULT_MODEL, metadata={"help": _TOKENIZER_HELP})
    chat_template: str | None = field(default=None, metadata={"help": _TEMPLATE_HELP})
    index: int = field(default=0, metadata={"help": "Which example (JSONL line) or packed row, from 0."})
    field: str = field(default="messages", metadata={"help": "Messages field of a chat JSONL."})


@dataclass
class StatsJob:
    """`soaes-data stats`: where the statistics go and what to count."""

    output_dir: str | None = field(default=None, metadata={
        "help": "Folder for stats.json and length_hist.png; unset = print only."})
    tokenizer: str | None = field(default=None, metadata={"help": "Also count tokens with this tokenizer."})
    field: str | None = field(default=None, metadata={"help": "Text field (default: text, or messages contents)."})


@dataclass(kw_only=True)
class DecontaminateJob(DecontamConfig):
    """`soaes-data decontaminate`: the `DecontamConfig` plus where kept records, rejects and the report go."""

    output_dir: str = field(metadata={
        "help": "Folder for kept.jsonl, rejects.jsonl, overlaps.jsonl, overlap_report.json and the manifest."})


@dataclass(kw_only=True)
class SynthJob(SynthConfig):
    """`soaes-data synth`: the `SynthConfig` plus the generator and the review file."""

    output: str = field(metadata={"help": "Review file to write (.csv or .jsonl)."})
    backend: Literal["local", "openai"] = field(default="local", metadata={
        "help": "local: a model run here; openai: an OpenAI-compatible endpoint."})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Local model spec, or the served model name for backend openai."})
    base_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (needed by backend openai)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend openai needs base_url (--base-url)")


@dataclass
class ReviewImportJob:
    """`soaes-data review-import`: where the approved chat records go."""

    output: str = field(metadata={"help": "JSONL of approved chat records."})
