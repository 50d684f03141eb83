"""soaes-specdec: Exact speculative decoding (PyTorch + Triton), baselines, benchmark and vLLM bridge."""

__version__ = "0.2.0"

from .decoding import (
    PromptLookupDecoder,
    SpecDecodeOutput,
    SpecStats,
    SpeculativeDecoder,
    autoregressive_generate,
)
from .draft import load_any_draft, make_layer_draft
from .feature_draft import FeatureDraft
from .proposers import Proposer
from .sampling import SamplingParams
from .settings import DecodingSettings

__all__ = [
    "DecodingSettings",
    "FeatureDraft",
    "PromptLookupDecoder",
    "Proposer",
    "SamplingParams",
    "SpecDecodeOutput",
    "SpecStats",
    "SpeculativeDecoder",
    "__version__",
    "autoregressive_generate",
    "load_any_draft",
    "make_layer_draft",
]
