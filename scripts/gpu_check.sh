#!/usr/bin/env bash
# Everything soaes does only on a GPU, in at most 10 minutes on one CUDA GPU: the CUDA-only tests, the verification-
# kernel sweep, the demo's draft stages (teacher_data → distill_draft → specdec_bench) on the GPU in bf16, the
# feature-draft trainer's bf16 autocast, and flash-attn when it is importable. Writes docs/bench/gpu_check.json (one
# entry per step) beside the steps' own docs/bench/gpu_*.json, and prints one summary line.
#
# Usage (repo root):  scripts/gpu_check.sh [--dry-run] [--out DIR]
#   --dry-run   print every step (budget and command) and run nothing
#   --out DIR   where the gpu_*.json files go (default docs/bench)
# Python: $PYTHON, else .venv/bin/python, else python3; uninstalled checkouts work (packages/*/src on PYTHONPATH).
set -uo pipefail

dry=0
out="docs/bench"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 2
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=".venv/bin/python"; else py="python3"; fi
PYTHONPATH="$(ls -d "$PWD"/packages/*/src | paste -sd:):$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false SOAES_PROGRESS=0
work="$(mktemp -d "${TMPDIR:-/tmp}/soaes-gpu-check.XXXXXX")"
run_dir="$work/demo"
soaes="$py -c 'from soaes.cli import main; main()'"
pytest="$py -m pytest -q -p no:cacheprovider"

names=(); budgets=(); requires=(); commands=()
# step NAME BUDGET_S REQUIRES COMMAND: REQUIRES is a Python module that must import (else the step is skipped) or -
step() { names+=("$1"); budgets+=("$2"); requires+=("$3"); commands+=("$4"); }

step environment 20 - \
  "nvidia-smi -L && $py -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())'"
step cuda_tests 150 - \
  "$pytest -m gpu packages/soaes-specdec/tests/test_specdec_cuda.py packages/soaes-specdec/tests/test_specdec_vllm_bridge.py packages/soaes-core/tests/test_core_placement.py"
step feature_draft_bf16 60 - \
  "$pytest -m gpu packages/soaes-distill/tests/test_distill_feature_kd.py -k 'mixed_precision and cuda'"
step flash_attn 60 flash_attn \
  "$pytest -m gpu packages/soaes-train/tests/test_train_attention.py -k flash_attention_2"
step kernel_sweep 90 triton \
  "$py benchmarks/specdec/kernel_bench.py --vocab 49152,152064 --batch 1,8 -n 3 --repeats 30 --out $out/gpu_kernel_sweep.json"
step demo_cuda_bf16 200 - \
  "$soaes pipeline run demo --quick -o $run_dir --set trained_target=embedded:smollm2-135m --set 'stages=[teacher_data, distill_draft, specdec_bench]' --set placement.device=cuda --set placement.dtype=bfloat16 --set specdec_bench.dtype=bfloat16 && cp $run_dir/stages/*_specdec_bench/distilled/bench.json $out/gpu_demo_bench.json"

if [ "$dry" = 1 ]; then
  total=0
  for i in "${!names[@]}"; do
    cond=""; [ "${requires[$i]}" != "-" ] && cond=" [if ${requires[$i]} imports]"
    echo "step ${names[$i]} budget=${budgets[$i]}s${cond}: ${commands[$i]}"
    total=$((total + budgets[i]))
  done
  echo "dry run: ${#names[@]} steps, budget ${total}s in all, outputs in $out/gpu_*.json"
  rm -rf "$work"
  exit 0
fi

mkdir -p "$out"
results="$work/results.tsv"
: > "$results"
for i in "${!names[@]}"; do
  name="${names[$i]}"; log="$work/$name.log"; start=$(date +%s)
  if [ "${requires[$i]}" != "-" ] && ! "$py" -c "import ${requires[$i]}" >/dev/null 2>&1; then
    status="skipped"; rc=0; echo "${requires[$i]} is not importable" > "$log"
  else
    timeout --kill-after=10 "${budgets[$i]}" bash -c "${commands[$i]}" > "$log" 2>&1
    rc=$?
    case "$rc" in 0) status="passed" ;; 124|137) status="timeout" ;; *) status="failed" ;; esac
    # a pytest step where nothing ran (exit 5: none selected; or every test skipped) is skipped, not passed
    if [ "$rc" = 5 ] || { [ "$rc" = 0 ] && grep -q -- "-m pytest" <<< "${commands[$i]}" \
        && ! grep -Eq '[0-9]+ passed' "$log"; }; then status="skipped"; rc=0; fi
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - start ))" "$log" >> "$results"
  echo "[$((i + 1))/${#names[@]}] $name: $status ($(( $(date +%s) - start ))s)" >&2
done

"$py" - "$results" "$out/gpu_check.json" <<'PY'
import json, os, subprocess, sys
rows = []
for line in open(sys.argv[1], encoding="utf-8"):
    name, status, rc, seconds, log = line.rstrip("\n").split("\t")
    text = open(log, encoding="utf-8", errors="replace").read()
    rows.append({"step": name, "status": status, "rc": int(rc), "seconds": int(seconds), "log_tail": text[-3000:]})
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except OSError:
    gpu = None
counts = {s: sum(r["status"] == s for r in rows) for s in ("passed", "failed", "timeout", "skipped")}
report = {"gpu": gpu, "steps": rows, "counts": counts, "seconds": sum(r["seconds"] for r in rows)}
tmp = sys.argv[2] + f".tmp{os.getpid()}"
with open(tmp, "w", encoding="utf-8") as fh:
    json.dump(report, fh, indent=1, ensure_ascii=False)
os.replace(tmp, sys.argv[2])
bad = counts["failed"] + counts["timeout"]
print(f"gpu_check: {'OK' if not bad else 'FAILED'} on {gpu or 'no GPU'}: {counts['passed']} passed, "
      f"{counts['failed']} failed, {counts['timeout']} timed out, {counts['skipped']} skipped in {report['seconds']}s "
      f"({', '.join(r['step'] + '=' + r['status'] for r in rows)}) → {sys.argv[2]}")
sys.exit(1 if bad else 0)
PY
rc=$?
rm -rf "$work"
exit "$rc"
