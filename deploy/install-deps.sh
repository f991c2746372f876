#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages grove builds and runs with. Idempotent:
# packages already present are left alone, and apt is only asked when
# something is missing.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git python3
  libzmq3-dev cppzmq-dev            # ZeroMQ and its C++ header binding
  capnproto libcapnp-dev            # Cap'n Proto compiler and library
  librocksdb-dev                    # replay store
  libgflags-dev libgoogle-glog-dev  # flags and logs
  libgtest-dev libgmock-dev libbenchmark-dev
  libopenblas-dev                   # CBLAS for the CPU model
  libginac-dev                      # symbolic verifier
  nlohmann-json3-dev                # JSON lines for verifiers, status, metrics
  libtomlplusplus-dev               # experiment configs
  procps psmisc                     # ps/pkill used by the launcher and tests
  openssh-client openssh-server     # deploy/ssh.sh and its loopback test
  python3-yaml                      # the deploy-files test reads the Kubernetes manifests
  bubblewrap                        # sandbox of the code-execution verifier
  slurm-wlm munge                   # the single-node Slurm test of deploy/slurm
  iproute2                          # network namespaces of the network-fault tests
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "install-deps: all packages present"
fi

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "install-deps: CUDA compiler found: GPU kernels and tests are built (they skip where no GPU is present)"
else
  echo "install-deps: no CUDA compiler: the CPU build is used (everything but the GPU kernels)"
fi
