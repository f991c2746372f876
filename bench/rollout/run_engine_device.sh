#!/bin/bash
# The GPU rollout engine's tests and benchmark on the device machine (from
# the repository root, programs built on the CPU machine into build/).
#   bench/rollout/run_engine_device.sh          tests, then decode_bench --quick
#   bench/rollout/run_engine_device.sh full     tests, then the full decode_bench
# Rough wall time on an H100: tests ~20 s, --quick ~30 s, full ~60-90 s.
set -u
rc=0
build/tests/rollout_kernel_tests --gtest_brief=1 || rc=1
build/tests/gpu_generator_test --gtest_brief=1 || rc=1
if [ "${1:-}" = "full" ]; then
  build/bench/decode_bench || rc=1
else
  build/bench/decode_bench --quick || rc=1
fi
exit $rc
