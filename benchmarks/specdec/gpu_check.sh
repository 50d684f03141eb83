#!/usr/bin/env bash
# soaes-specdec on a CUDA GPU: compiled-kernel and decoder exactness tests, kernel timings, decoding-cost benchmark.
# Usage (repo root, GPU machine, packages need not be installed): benchmarks/specdec/gpu_check.sh SHAPE_DIR OUT_DIR
# SHAPE_DIR holds a SmolLM2-135M config.json and tokenizer files; the weights are drawn at random there.
set -uo pipefail
shape="$1"; out="${2:-runs/gpu-check}"; mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
PYTHONPATH="$(ls -d "$PWD"/packages/*/src | paste -sd:)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SOAES_PROGRESS=0
nvidia-smi -L
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
python3 -m pytest -q -p no:cacheprovider packages/soaes-specdec/tests/test_specdec_cuda.py 2>&1 | tee "$out/pytest_cuda.log"
python3 "$here/kernel_bench.py" --out "$out/kernel_bench.json" 2>&1 | tee "$out/kernel_bench.md"
python3 "$here/random_weights.py" "$shape" /tmp/smollm2-random
python3 -c "from soaes_specdec.cli import main; main()" -v bench --config "$here/gpu_random_smollm2.yaml" \
  --target /tmp/smollm2-random --out "$out/bench" 2>&1 | tail -40
