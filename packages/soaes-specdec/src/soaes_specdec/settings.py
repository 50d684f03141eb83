"""The decoding settings of `SpeculativeDecoder`, defined once: the decoder, the benchmark's `BenchConfig`, the
pipeline's bench section and the `soaes-specdec` commands all take this dataclass (CLI options are generated from its
fields), and `validate` is the one place their values are checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from soaes_core.errors import InvalidArgumentError

DEFAULT_MAX_SPECULATIVE_TOKENS = 5


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class DecodingSettings:
    """How `SpeculativeDecoder` proposes and verifies: block size (fixed, or chosen each step from this host's costs and
    the running acceptance), the draft's early stop, prompt lookup beside the draft, and the verify pass's options."""

    num_speculative_tokens: int | None = field(default=None, metadata={
        "help": "Tokens the draft proposes per block; unset = chosen each step (0 = a plain step) from this host's "
                "measured costs and the running acceptance, up to max_speculative_tokens."})
    max_speculative_tokens: int = field(default=DEFAULT_MAX_SPECULATIVE_TOKENS, metadata={
        "help": "Largest block size the decoder may choose when num_speculative_tokens is unset."})
    draft_confidence: float = field(default=0.0, metadata={
        "help": "Dynamic draft length: end a block once every row's top draft probability is below this; 0 = off."})
    lookup_tokens: int = field(default=0, metadata={
        "help": "Prompt lookup beside the draft: a row whose last lookup_min_ngram..lookup_max_ngram tokens occurred "
                "earlier proposes up to this many tokens that followed them; 0 = off."})
    lookup_max_ngram: int = field(default=3, metadata={"help": "Longest suffix n-gram prompt lookup matches."})
    lookup_min_ngram: int = field(default=2, metadata={
        "help": "Shortest suffix n-gram that counts as a prompt-lookup match (rows with shorter ones use the draft)."})
    lookup_extend: bool = field(default=False, metadata={
        "help": "After the draft's tokens, also propose what followed an earlier occurrence of the text's last n-gram "
                "(up to lookup_tokens in all); needs lookup_tokens above the block size."})
    lookup_mix: float = field(default=0.0, metadata={
        "help": "Sampling: draw a lookup row's first proposal from this mixture of the lookup's token and the "
                "draft's distribution (0 = the lookup's token); needs lookup_tokens > 0."})
    prepack: bool = field(default=False, metadata={
        "help": "Keep MKL-packed copies of the target's weights for the verify row counts (fp32 CPU); with a cost "
                "table, only the row counts where packing was measured fastest are packed."})
    batch_invariant: bool = field(default=False, metadata={
        "help": "Verify token by token through plain decoding's one-row calls: greedy output bit-identical to plain "
                "decoding in every dtype, but a verify costs n+1 steps."})
    calibration_file: str | None = field(default=None, metadata={
        "help": "JSON cost table (soaes-specdec calibrate --out) to choose block sizes and projection paths from; "
                "unset = measured on this host once and cached."})

    def __post_init__(self) -> None:
        self.validate()

    @property
    def adaptive(self) -> bool:
        """True when the block size is chosen each step (no fixed num_speculative_tokens)."""
        return self.num_speculative_tokens is None

    @property
    def max_block(self) -> int:
        """The most tokens one block may propose from the draft (the fixed n, or the adaptive bound)."""
        return self.max_speculative_tokens if self.num_speculative_tokens is None else self.num_speculative_tokens

    @property
    def block_width(self) -> int:
        """The most tokens one block may propose from any source (draft or lookup)."""
        return max(self.max_block, self.lookup_tokens)

    def validate(self) -> None:
        """Check every setting and how they combine; one `InvalidArgumentError` line naming the setting."""
        n = self.num_speculative_tokens
        if n is not None and (not _is_int(n) or n < 1):
            raise InvalidArgumentError(f"num_speculative_tokens must be an int >= 1 (or unset: chosen per step), "
                                       f"got {n!r}")
        if not _is_int(self.max_speculative_tokens) or self.max_speculative_tokens < 1:
            raise InvalidArgumentError(f"max_speculative_tokens must be an int >= 1, got "
                                       f"{self.max_speculative_tokens!r}")
        if not _is_number(self.draft_confidence) or not 0.0 <= self.draft_confidence < 1.0:
            raise InvalidArgumentError(f"draft_confidence must be in [0, 1), got {self.draft_confidence!r}")
        if not _is_int(self.lookup_tokens) or self.lookup_tokens < 0:
            raise InvalidArgumentError(f"lookup_tokens must be an int >= 0 (0 = no prompt lookup), got "
                                       f"{self.lookup_tokens!r}")
        lo, hi = self.lookup_min_ngram, self.lookup_max_ngram
        if not (_is_int(lo) and _is_int(hi) and 1 <= lo <= hi):
            raise InvalidArgumentError(f"need 1 <= lookup_min_ngram <= lookup_max_ngram, got {lo!r} and {hi!r}")
        for name in ("lookup_extend", "prepack", "batch_invariant"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be true or false, got {getattr(self, name)!r}")
        # a chosen n may leave no room for an extension in some blocks; a fixed n that always does is a mistake
        least = n if n is not None else 1
        if self.lookup_extend and self.lookup_tokens <= least:
            raise InvalidArgumentError(
                f"lookup_extend appends lookup tokens after the draft's {least}, up to lookup_tokens in all: "
                f"lookup_tokens ({self.lookup_tokens}) must exceed num_speculative_tokens ({least})")
        if not _is_number(self.lookup_mix) or not 0.0 <= self.lookup_mix < 1.0:
            raise InvalidArgumentError(f"lookup_mix must be a number in [0, 1), got {self.lookup_mix!r}")
        if self.lookup_mix > 0 and not self.lookup_tokens:
            raise InvalidArgumentError("lookup_mix mixes prompt lookup's proposal with the draft's: it needs "
                                       "lookup_tokens > 0")
        if self.calibration_file is not None and not isinstance(self.calibration_file, str):
            raise InvalidArgumentError(f"calibration_file must be a path, got {self.calibration_file!r}")
