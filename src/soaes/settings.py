"""Settings of the root `soaes` commands that are not a package's: the server (`soaes serve`). Each field carries its
help text; the command's options are generated from it (soaes_core.cli_options)."""

from __future__ import annotations

from dataclasses import dataclass, field

from soaes_core import DEFAULT_MODEL


@dataclass
class ServeSettings:
    """An OpenAI-compatible server of a target with its draft on the exact speculative decoder."""

    target: str = field(default=DEFAULT_MODEL, metadata={"help": "Target model spec."})
    draft: str | None = field(default=None, metadata={
        "help": "Draft directory (a layer draft or a feature draft); unset = plain decoding."})
    num_speculative_tokens: int = field(default=3, metadata={"help": "Draft tokens per block."})
    lookup_tokens: int = field(default=0, metadata={
        "help": "Prompt-lookup tokens proposed instead of the draft's where the text repeats (0: off)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (loopback by default)."})
    port: int = field(default=8000, metadata={"help": "Port to bind (0: any free port)."})
    api_key: str | None = field(default=None, metadata={
        "help": "Require `Authorization: Bearer KEY` on /v1 routes; unset = $SOAES_API_KEY, if set."})
    max_batch: int = field(default=8, metadata={"help": "Requests decoded together (rows join and leave between "
                                                         "steps)."})
    max_queue: int = field(default=64, metadata={"help": "Requests waiting for a row; more get HTTP 429."})
    max_context: int = field(default=2048, metadata={
        "help": "Prompt + new tokens per request (capped at the target's context)."})
    served_model_name: str | None = field(default=None, metadata={
        "help": "Model name clients ask for; unset = the target spec."})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name, low in (("max_batch", 1), ("max_queue", 0), ("max_context", 2), ("num_speculative_tokens", 1),
                          ("lookup_tokens", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
