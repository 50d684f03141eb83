"""soaes-specdec: Exact speculative decoding (PyTorch + Triton), baselines, benchmark and vLLM bridge."""

__version__ = "0.2.0"

from .decoding import (
    PromptLookupDecoder,
    SpecDecodeOutput,
    SpecStats,
    SpeculativeDecoder,
    autoregressive_generate,
)
from .draft import make_layer_draft
from .sampling import SamplingParams

__all__ = [
    "PromptLookupDecoder",
    "SamplingParams",
    "SpecDecodeOutput",
    "SpecStats",
    "SpeculativeDecoder",
    "__version__",
    "autoregressive_generate",
    "make_layer_draft",
]
