"""soaes-train: Continual pre-training and domain-progressive SFT on transformers + DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
