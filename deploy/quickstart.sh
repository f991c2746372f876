#!/usr/bin/env bash
# Installs what is missing, builds grove, and runs the default local cluster:
# coordinator, replay store, learner, two rollout workers and two verifiers,
# each its own process, training a small MoE model with GRPO. One progress
# line per learner step; a before/after table at the end.
# Usage: ./deploy/quickstart.sh [CONFIG] [extra grove up flags]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
./deploy/install-deps.sh
build=${GROVE_BUILD_DIR:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=${GROVE_BUILD_TYPE:-RelWithDebInfo} ${GROVE_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j"$(nproc)" --target grove
config=${1:-configs/default.toml}
shift || true
exec "$build/bin/grove" up --config "$config" "$@"
