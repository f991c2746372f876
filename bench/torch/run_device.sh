#!/usr/bin/env bash
# The baseline's run on the GPU machine, from a folder holding grpo_step.py,
# gpu-ref.toml and the check-* folders dump_reference wrote (see
# docs/gpu-learner-baseline.md for how that folder is staged):
#   bash run_device.sh [SECONDS] MODE:IMPL[:OPTS] ...
# OPTS: comma-separated "replay" (routing replay) and/or "bN" (batch N; default 32).
# Runs every --check, then one process per configuration (a failure or OOM
# costs only its row), all inside SECONDS (default 560), and prints the table.
# Results go to $OUT (the device tool's folder) or /tmp/torchbase.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-/tmp/torchbase}
mkdir -p "$out"
budget=560
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then budget=$1; shift; fi
deadline=$(( $(date +%s) + budget ))
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$out/gpu.txt"
for d in "$here"/check-*; do
  [[ -d $d ]] && python3 "$here/grpo_step.py" --check "$d"
done 2>&1 | tee "$out/check.txt"
for spec in "$@"; do
  IFS=: read -r mode impl extra <<< "$spec"
  left=$(( deadline - $(date +%s) ))
  if (( left < 40 )); then echo "no time left for $spec" | tee -a "$out/skipped.txt"; continue; fi
  limit=$(( left < 300 ? left - 5 : 300 ))
  flags=()
  IFS=, read -ra opts <<< "${extra:-}"
  for o in "${opts[@]}"; do
    case $o in
      replay) flags+=(--replay) ;;
      b[0-9]*) flags+=(--batch "${o#b}") ;;
      *) echo "unknown option $o in $spec" >&2; exit 2 ;;
    esac
  done
  echo "== $spec (limit ${limit}s)"
  timeout "$limit" python3 "$here/grpo_step.py" --config "$here/gpu-ref.toml" --random --mode "$mode" \
    --impl "$impl" "${flags[@]}" --results "$out/results.jsonl" 2>&1 | tail -n 25 | tee -a "$out/log.txt"
  if [[ ${PIPESTATUS[0]} -eq 124 ]]; then
    printf '{"mode": "%s", "impl": "%s", "error": "timed out after %ss (compile + warm-up + steps)"}\n' \
      "$mode" "$impl" "$limit" >> "$out/results.jsonl"
  fi
done
[[ -f $out/results.jsonl ]] && python3 "$here/grpo_step.py" --table "$out/results.jsonl" | tee "$out/table.md"
