"""soaes-eval: CMMLU / C-Eval via lm-evaluation-harness, Chinese ROUGE/BLEU, paper-style reports."""

__version__ = "0.2.0"

from .metrics import bleu4, rouge, text_metrics  # light: metric libraries load on first use

__all__ = ["__version__", "bleu4", "rouge", "text_metrics"]
