"""Save a model with a given config and seeded random weights (for timing on machines the real weights can't reach).

Decoding costs (c, c_v, tokens/s, bandwidth) depend on the shapes only; acceptance rates of such a model mean nothing.
Usage: python benchmarks/specdec/random_weights.py CONFIG_AND_TOKENIZER_DIR OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="directory with config.json and tokenizer files")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.src))
    model.save_pretrained(args.out)
    for f in args.src.iterdir():
        if f.name != "config.json":
            shutil.copy(f, args.out / f.name)


if __name__ == "__main__":
    main()
