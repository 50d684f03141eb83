"""The settings of the `soaes-specdec` commands other than `bench` (`cli.BenchJob`) and `calibrate`
(`calibrate_cmd`), one dataclass per command: their fields, with help text, are the commands' options
(`soaes_core.cli_options.config_options`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from soaes_core import DEFAULT_MODEL
from soaes_core.errors import InvalidArgumentError

from .settings import DecodingSettings


@dataclass
class GenerateConfig(DecodingSettings):
    """`soaes-specdec generate`: the decoder's settings (inherited) plus the models and the sampling of one reply."""

    target: str = field(default=DEFAULT_MODEL, metadata={"help": "Target model spec."})
    draft: str | None = field(default=None, metadata={
        "help": "Draft model spec, a layer draft or a feature-draft directory; unset = the target's first "
                "--draft-layers layers."})
    draft_layers: int = field(default=4, metadata={"help": "Layers kept when deriving the draft from the target."})
    method: Literal["speculative", "prompt_lookup", "plain"] = field(default="speculative", metadata={
        "help": "Decoder: speculative (the draft, with prompt lookup when lookup_tokens > 0), prompt_lookup alone, "
                "or plain decoding."})
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (top-p/temperature) or argmax."})
    top_p: float = field(default=0.7, metadata={"help": "Top-p when sampling."})
    temperature: float = field(default=1.0, metadata={"help": "Temperature when sampling."})
    chat: bool = field(default=True, metadata={"help": "Wrap PROMPT in the chat template."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling."})
    stats: bool = field(default=True, metadata={"help": "Print the decoder's counters as JSON at the end."})

    def validate(self) -> None:
        """The decoder's checks, then the reply's own, before any model is loaded."""
        super().validate()
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")

    def decoding_settings(self) -> DecodingSettings:
        """The decoder's part of this config."""
        return DecodingSettings(**{f.name: getattr(self, f.name) for f in fields(DecodingSettings)})


@dataclass
class VllmBenchConfig:
    """`soaes-specdec vllm-bench`: plain vs speculative decoding through vLLM."""

    target: str = field(metadata={"help": "Target model (HF dir or hub id vLLM can load)."})
    draft: str | None = field(default=None, metadata={"help": "Draft model; unset = vLLM's n-gram prompt lookup."})
    num_speculative_tokens: int = field(default=3, metadata={"help": "Tokens proposed per block."})
    prompts: str | None = field(default=None, metadata={"help": "JSONL prompts; unset = the packaged prompts."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (top-p/temperature) or argmax."})
    top_p: float = field(default=0.7, metadata={"help": "Top-p when sampling."})
    temperature: float = field(default=1.0, metadata={"help": "Temperature when sampling."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated per prompt."})
    repeats: int = field(default=3, metadata={"help": "Timed passes."})
    out: str = field(default="vllm_bench.json", metadata={"help": "Where the JSON result is written."})


@dataclass
class ExportConfig:
    """`soaes-specdec export DRAFT_DIR`: a draft in a serving engine's format, with the serve command."""

    format: Literal["vllm", "vllm-eagle", "sglang-eagle", "gguf"] | None = field(default=None, metadata={
        "help": "Required by `export`. vllm: a layer draft for vLLM's draft_model method; vllm-eagle / "
                "sglang-eagle: an engine-layout feature draft as the engine's EAGLE-1 draft folder; gguf: for "
                "llama.cpp."})
    target: str | None = field(default=None, metadata={
        "help": "The target's HF model directory, served with the draft (all formats but gguf)."})
    num_speculative_tokens: int = field(default=3, metadata={"help": "Tokens the engine's draft proposes per block."})
    out: str = field(default="serve", metadata={"help": "Output folder."})
    outtype: str = field(default="f32", metadata={"help": "gguf: tensor type of the converted model."})
    allow_other_target: bool = field(default=False, metadata={
        "help": "Export a feature draft for a target other than the one it was trained for."})
