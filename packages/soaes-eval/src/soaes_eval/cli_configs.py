"""Settings of the one-shot `soaes-eval` commands as dataclasses, so that each command's options, `--config` YAML
and `--set` keys come from one definition (`soaes_core.cli_options.config_options`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .fetch import DEFAULT_TIMEOUT_S


@dataclass
class MetricsJob:
    """`soaes-eval metrics`: how to score a JSONL of {prediction, reference} and where the scores go."""

    references: str | None = field(default=None, metadata={"help": "Separate JSONL with a 'reference' field."})
    lang: Literal["zh", "en"] = field(default="zh", metadata={"help": "Language of the texts."})
    convention: Literal["all", "llamafactory", "jieba", "char"] = field(default="all", metadata={
        "help": "Tokenisation convention of the scores (all: every one; English uses llamafactory's)."})
    output: str | None = field(default=None, metadata={"help": "Write the scores and provenance as JSON."})


@dataclass
class TableJob:
    """`soaes-eval table`: where the tables go and which runs they are relative to."""

    output_dir: str = field(default="eval_tables", metadata={"help": "Folder for tables.md, CSV and PNG files."})
    base: str | None = field(default=None, metadata={
        "help": "Run label that Table 1 retention is relative to (default: the first run)."})
    baseline: str | None = field(default=None, metadata={
        "help": "Run label that Table 4 speedup is relative to (default: the run without draft)."})
    plots: bool = field(default=True, metadata={"help": "Also draw a PNG plot of each table."})


@dataclass
class FetchJob:
    """`soaes-eval fetch`: where to unpack a CMMLU / C-Eval release and how to download and verify it."""

    dest: str | None = field(default=None, metadata={
        "help": "Unpack here, not in $SOAES_CACHE/benchmarks/BENCHMARK (then pass --cmmlu-dir/--ceval-dir DIR)."})
    url: str | None = field(default=None, metadata={
        "help": "Archive URL or local zip (default: the official release on the Hugging Face Hub)."})
    sha256: str | None = field(default=None, metadata={
        "help": "Expected sha256 of the archive (default: pinned by the first download of the URL)."})
    timeout: float = field(default=DEFAULT_TIMEOUT_S, metadata={
        "help": "Seconds for the whole download (a stalled or trickling server fails after it; a rerun resumes)."})
