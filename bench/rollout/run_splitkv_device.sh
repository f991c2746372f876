#!/bin/bash
# Split-KV paged decode attention (issue 9) on the device machine, from the
# repository root, programs built on the CPU machine into build/.
#   bench/rollout/run_splitkv_device.sh          tests (~10 s), then benches (~40 s)
#   bench/rollout/run_splitkv_device.sh tests    tests only
#   bench/rollout/run_splitkv_device.sh bench    benches only
# Programs: build/tests/{rollout_kernel_tests,gpu_generator_test},
# build/bench/{kernel_bench,decode_bench}.
set -u
rc=0
what="${1:-all}"
if [ "$what" != "bench" ]; then
  build/tests/rollout_kernel_tests --gtest_filter='PagedKv*' --gtest_brief=1 || rc=1
  build/tests/gpu_generator_test --gtest_filter='*SplitKv*:*GreedyMatches*' --gtest_brief=1 || rc=1
fi
if [ "$what" != "tests" ]; then
  # The kernels alone: batch 1..128 x context 128..4096, ~5 s (of it ~3 s
  # filling 0.5 GB of random KV on the host).
  build/bench/kernel_bench --paged || rc=1
  # End to end: every opt-in path (split_kv among them) at a long context,
  # bf16 only, b1/b8: one model init (~8 s), ~30 s.
  build/bench/decode_bench --variants --plans bf16 --prompt 2048 --variant_batches 1,8 || rc=1
fi
exit $rc
