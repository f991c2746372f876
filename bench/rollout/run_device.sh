#!/usr/bin/env bash
# The quantized kernels' run on the GPU machine (issue 9), from the repository
# root of a build tree holding build/tests/quant_kernel_tests and
# build/bench/quant_linear_bench:
#   bash bench/rollout/run_device.sh [--tests-only] [--quick]
# Tests first (~10-20 s: most of it the CPU references), then the benchmark
# (~15-30 s with --quick, the default run under 60 s on an H100). Output also
# goes to $OUT (the device tool's folder) when set.
set -u
out=${OUT:-/tmp/qkern}
mkdir -p "$out"
tests_only=0
bench_flags=()
for a in "$@"; do
  case $a in
    --tests-only) tests_only=1 ;;
    --quick) bench_flags+=(--quick) ;;
    *) echo "usage: $0 [--tests-only] [--quick]" >&2; exit 2 ;;
  esac
done
rc=0
timeout 240 build/tests/quant_kernel_tests --gtest_brief=1 2>&1 | tee "$out/quant_kernel_tests.txt"
rc=${PIPESTATUS[0]}
if (( tests_only == 0 )); then
  timeout 120 build/bench/quant_linear_bench "${bench_flags[@]}" 2>&1 | tee "$out/quant_linear_bench.txt"
  (( rc == 0 )) && rc=${PIPESTATUS[0]}
fi
exit "$rc"
