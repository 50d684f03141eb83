"""soaes-eval: CMMLU / C-Eval via lm-evaluation-harness, Chinese ROUGE/BLEU, paper-style reports."""

__version__ = "0.1.0"
