"""lm-eval ``!function`` entry points (lm-eval imports this file by path, so it only re-exports)."""

from soaes_eval.tasks.loaders import load_ceval_subject, load_cmmlu_subject

__all__ = ["load_ceval_subject", "load_cmmlu_subject"]
