#!/usr/bin/env bash
# soaes-eval benchmark: the embedded SmolLM2-135M through every path of `soaes-eval run` on the bundled SAMPLE
# files (scores on samples mean nothing; this measures the machinery), then `soaes-eval table`.
# Usage: benchmarks/eval/run_bench.sh [OUT_DIR]   (CPU is fine; set DEVICE=cuda on a GPU machine)
set -euo pipefail
OUT=${1:-bench_out/eval}
DEVICE=${DEVICE:-cpu}
DRAFT_LAYERS=${DRAFT_LAYERS:-6}
MAX_TOKS=${MAX_TOKS:-64}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
SAMPLES=$(python -c 'import soaes_eval.tasks as t; print(t.SAMPLES_DIR)')
M=embedded:smollm2-135m
common=(--model "$M" --data-dir "$SAMPLES" --device "$DEVICE")
rm -rf "$OUT"; mkdir -p "$OUT"
t0=$(date +%s)
soaes-eval run "${common[@]}" --tasks soaes_cmmlu,soaes_ceval --batch-size 16 --name SmolLM2-135M -o "$OUT/general"
t1=$(date +%s)
soaes-eval run "${common[@]}" --tasks soaes_domain_qa,soaes_domain_report --max-gen-toks "$MAX_TOKS" --batch-size 1 \
  --name "hf greedy" --stage "instruct (no domain SFT)" -o "$OUT/domain_hf"
t2=$(date +%s)
soaes-eval run "${common[@]}" --backend specdec --tasks soaes_domain_qa --max-gen-toks "$MAX_TOKS" \
  --name "autoregressive" -o "$OUT/spd_ar"
soaes-eval run "${common[@]}" --draft "layers:$DRAFT_LAYERS" -n 3 --tasks soaes_domain_qa --max-gen-toks "$MAX_TOKS" \
  --name "layers:$DRAFT_LAYERS n=3" -o "$OUT/spd_layers"
t3=$(date +%s)
soaes-eval table "$OUT" --base SmolLM2-135M -o "$OUT/tables" > "$OUT/tables.log"
echo "wall seconds: general=$((t1-t0)) domain_hf=$((t2-t1)) specdec_runs=$((t3-t2))" | tee "$OUT/timings.txt"
cat "$OUT/tables/tables.md"
