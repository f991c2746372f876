#!/bin/bash
# The GPU rollout worker's tests and benchmarks on the device machine (from the
# repository root, programs built on the CPU machine into build/; configs/ and
# bench/torch/ from the tree).
#   bench/rollout/run_gpurun_device.sh          tests + mismatch_bench --quick + ipc_stall_bench + HF baseline
#   bench/rollout/run_gpurun_device.sh e2e      also the shortened GPU runs (grove up): gpu-1-small.toml,
#                                               gpu-1.toml (the 1.7B reference model) and, on 2 GPUs, gpu-2.toml
# Rough wall time on an H100: tests ~10 s, mismatch_bench --quick ~30-60 s
# (GPU reference model; most of it the CPU init and the CPU-calibrated plan),
# ipc_stall_bench ~30-60 s (6.7 GB through host copies and checksums),
# hf_generate.py ~60-120 s, e2e ~60-120 s a run (the reference model's
# learner starts in ~1 min: host init, uploads).
set -u
rc=0
export GROVE_SOURCE_DIR=$PWD GROVE_BIN=$PWD/build/bin
build/tests/generation_backend_test --gtest_brief=1 || rc=1
build/tests/weight_source_test --gtest_brief=1 || rc=1
build/tests/sampled_mismatch_test --gtest_brief=1 || rc=1
build/tests/gpu_precision_plan_test --gtest_brief=1 || rc=1
build/tests/learner_gpu_tests --gtest_brief=1 || rc=1
if [ "${1:-}" = "e2e" ]; then
  build/tests/e2e_training_test --gtest_filter='*Gpu*' || rc=1
  # Each run's figures: the stall per version, the last progress lines.
  for run in $(ls -td /tmp/grove_e2e_gpu-*/gpu-*/ 2>/dev/null); do
    echo "--- $run"
    grep -h "via cuda-ipc: stall\|via nccl: stall" "$run"/logs/rollout-0.log | tail -n 3
    grep -h "warm-start done\|^step" "$(dirname "$run")/up.log" | tail -n 4
  done
fi
timeout 150 build/bench/mismatch_bench --quick || rc=1
timeout 120 build/bench/ipc_stall_bench --versions=2 || rc=1
if python3 -c 'import torch, transformers' 2>/dev/null; then
  timeout 200 python3 bench/torch/hf_generate.py --random --batches 1,8,32 --repeats 2 || rc=1
else
  python3 bench/torch/hf_generate.py --random  # prints which of torch / transformers is missing
fi
exit $rc
