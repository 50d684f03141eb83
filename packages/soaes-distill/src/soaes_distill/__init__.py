"""soaes-distill: Offline teacher logits, KD losses and trainer, and draft-model training methods."""

__version__ = "0.2.0"
