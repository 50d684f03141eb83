#!/usr/bin/env bash
# Reproduce the soaes-specdec section of docs/benchmarks.md: speculative decoding vs baselines and transformers peers on this CPU.
# Usage: [BENCH_CONFIG=file.yaml] benchmarks/specdec/run_cpu_bench.sh [OUT_DIR] [extra soaes-specdec bench flags...]
# Measure on an idle machine: batch-1 decoding is memory-bound and shared CPUs make the numbers noisy.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-runs/specdec-bench}"
shift || true
export HF_HUB_OFFLINE=1 SOAES_PROGRESS="${SOAES_PROGRESS:-1}"
soaes-specdec -v bench --config "${BENCH_CONFIG:-$here/cpu_smollm2.yaml}" --out "$out" "$@"
