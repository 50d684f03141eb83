"""soaes-specdec: Exact speculative decoding (PyTorch + Triton), baselines, benchmark and vLLM bridge."""

__version__ = "0.1.0"
