#!/bin/bash
# The decode-step tuning work (issue 9 benchmarks) on the device machine,
# from the repository root, programs built on the CPU machine into build/.
#   bench/rollout/run_qtune_device.sh          tests (~35 s), then benches (~45 s)
#   bench/rollout/run_qtune_device.sh tests    tests only
#   bench/rollout/run_qtune_device.sh bench    benches only
# Programs: build/tests/{quant_kernel_tests,step_kernel_tests,kernel_tests,
# gpu_generator_test}, build/bench/{decode_bench,quant_linear_bench}.
set -u
rc=0
what="${1:-all}"
if [ "$what" != "bench" ]; then
  build/tests/quant_kernel_tests --gtest_brief=1 || rc=1
  build/tests/step_kernel_tests --gtest_filter='MoePermute*' --gtest_brief=1 || rc=1
  build/tests/kernel_tests --gtest_filter='Router*' --gtest_brief=1 || rc=1
  build/tests/gpu_generator_test --gtest_brief=1 || rc=1
fi
if [ "$what" != "tests" ]; then
  # Per-phase profile of the eager decode step (b1, b32) and every opt-in
  # path off/on at b1/8/32, bf16 and int4: one model init (~8 s), ~30 s.
  build/bench/decode_bench --profile --variants --plans bf16,int4 || rc=1
  # The GEMV rows-per-warp variants at m = 1, 4 on the gpu-ref shapes, ~10 s.
  build/bench/quant_linear_bench --quick --gemv_variants || rc=1
fi
exit $rc
