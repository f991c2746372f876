#!/usr/bin/env bash
# Installs what is missing, builds grove, and runs the whole test suite.
# Usage: ./deploy/test.sh [extra ctest arguments, e.g. -R model]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
./deploy/install-deps.sh
build=${GROVE_BUILD_DIR:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=${GROVE_BUILD_TYPE:-RelWithDebInfo} ${GROVE_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest --output-on-failure --timeout 900 -j"${GROVE_TEST_JOBS:-2}" "$@"
