#!/usr/bin/env bash
# Builds the libFuzzer binaries (clang, ASan + UBSan) and fuzzes each target
# for a while over its corpus. Not part of ctest: the suite replays the
# corpus with the gcc build instead (docs/fuzzing.md).
#
#   tests/fuzz/run.sh                 # every target, 20 s each
#   tests/fuzz/run.sh -t 300 reward   # one target, 5 minutes
#   options: -t SECONDS per target (20), -j build jobs (2), -b build dir (build-fuzz)
#
# New inputs libFuzzer finds go to BUILD/corpus/<target> (the checked-in seeds
# stay read-only); crashes to BUILD/crashes/<target>/. Turn a crash into a fix,
# then copy its input to tests/fuzz/regressions/<target>/ so the suite replays
# it. Exit status: 0 when no target crashed, 1 otherwise, 2 when the build
# cannot be made (no clang, or -fsanitize=fuzzer does not link).
set -euo pipefail

seconds=20
jobs=2
build=build-fuzz
while getopts "t:j:b:h" opt; do
  case $opt in
    t) seconds=$OPTARG ;;
    j) jobs=$OPTARG ;;
    b) build=$OPTARG ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
all_targets=(frame config safetensors reward training_group weight_chunks replay_value python_code)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")

if ! command -v clang++ >/dev/null 2>&1; then
  echo "run.sh: clang++ not found (Debian: apt-get install clang libclang-rt-14-dev)" >&2
  exit 2
fi

# The libraries under test get coverage instrumentation and the sanitizers
# through the global flags; the targets add -fsanitize=fuzzer themselves.
san="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
mkdir -p "$build"
if [ ! -f "$build/CMakeCache.txt" ]; then
  CC=clang CXX=clang++ cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGROVE_CUDA=OFF \
    -DGROVE_FUZZ=ON "-DCMAKE_C_FLAGS=$san" "-DCMAKE_CXX_FLAGS=$san" >"$build/configure.log" 2>&1 ||
    { echo "run.sh: configure failed, see $build/configure.log" >&2; exit 2; }
fi
cmake --build "$build" -j"$jobs" --target "${targets[@]/#/fuzz_}" ||
  { echo "run.sh: build failed (is libclang-rt-14-dev installed? see $build/configure.log)" >&2; exit 2; }

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$root/tests/fuzz/lsan.supp}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
status=0
summary=()
for t in "${targets[@]}"; do
  work="$build/corpus/$t"
  crashes="$build/crashes/$t"
  mkdir -p "$work" "$crashes"
  dirs=("$work" "tests/fuzz/corpus/$t")
  [ -d "tests/fuzz/regressions/$t" ] && dirs+=("tests/fuzz/regressions/$t")
  log="$build/fuzz-$t.log"
  echo "== fuzz_$t for ${seconds}s"
  set +e
  "$build/fuzz/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$crashes/" "${dirs[@]}" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
  if [ $rc -ne 0 ]; then
    status=1
    summary+=("$(printf '%-16s FAILED rc=%d after %s execs; see %s and %s' "$t" "$rc" "${execs:-?}" "$log" "$crashes")")
    grep -m3 -E 'ERROR|SUMMARY|fuzz check failed|runtime error' "$log" || true
  else
    summary+=("$(printf '%-16s %10s execs  %6.0f exec/s  cov %s' "$t" "$execs" "$(awk -v e="${execs:-0}" -v s="$seconds" 'BEGIN{print e/s}')" "${cov:-?}")")
  fi
done
echo "== summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
exit $status
