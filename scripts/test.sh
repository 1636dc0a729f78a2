#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need
# (Debian packages, a Python virtual environment with tritonclient), creates
# the model repository, then runs `cargo test` for the workspace.
#
#   scripts/test.sh [extra cargo test arguments]
#
# Then, outside cargo: the Kubernetes manifests checked offline (needs kubectl for `kubectl kustomize`), and the
# containers end to end with docker compose where a Docker engine answers.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'test.sh: %s\n' "$*" >&2; }

# Debian packages: Chromium and its WebDriver for the gateway's browser test.
need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    say "installing ${need_apt[*]}"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# Python: tritonclient[grpc,http] is the third-party client of the interop test; kubernetes-validate and PyYAML check
# the Kubernetes manifests. pip returns at once when the pinned versions are already there.
if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv"
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
# Triton's perf_analyzer, for the interop test: a venv of its own (its tritonclient is older) and Debian's libb64.
scripts/perf-analyzer.sh --install-only

# Build every test and binary first, then make the model repository with the converter that build produced: a
# separate `cargo run` would unify features differently (no dev-dependencies) and compile much of the tree twice.
say "building the workspace and its tests"
cargo test --workspace --locked --no-run "$@"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
# It keeps the published files in .cache/ too: the darknet reader's and the converters' tests read them.
MAKE_MODEL_REPOSITORY="$target_dir/debug/make-model-repository" scripts/setup-model-repository.sh

export OIP_PYTHON="$root/.venv/bin/python"
say "running cargo test"
cargo test --workspace --locked "$@"

# The benchmark script end to end in seconds, on the binaries just tested: it proves the script and the load
# generator work together; its numbers are thrown away and nothing is asserted about speed.
say "running scripts/bench.sh --smoke"
scripts/bench.sh --smoke

# The soak script likewise, in seconds: mixed traffic with the refusals it expects, and no other error.
say "running scripts/soak.sh --smoke"
scripts/soak.sh --smoke

say "checking that both images run as non-root users with read-only root filesystems"
.venv/bin/python scripts/check-containers.py

if command -v kubectl >/dev/null 2>&1; then
    say "checking the Kubernetes manifests"
    .venv/bin/python scripts/check-k8s.py
else
    say "kubectl not found: skipped the Kubernetes manifest checks (scripts/check-k8s.py)"
fi

if docker info >/dev/null 2>&1; then
    # dev: the binaries cargo test just built, so CI compiles the workspace once.
    say "running the containers end to end"
    IMAGE_PROFILE=dev scripts/compose-test.sh
    say "running the containers end to end with mutual TLS between the tiers"
    IMAGE_PROFILE=dev COMPOSE_TLS=1 scripts/compose-test.sh
else
    say "no Docker engine answers: skipped the containers end to end (scripts/compose-test.sh)"
fi

# The CUDA build, with NVIDIA's compiler from PyPI and no GPU: it compiles and links (scripts/gpu-check.sh runs it
# on a GPU). Last, because it replaces target/debug/model-server with the CUDA binary, which needs the NVIDIA
# driver to start; the containers above run the CPU one. SKIP_CUDA_BUILD=1 leaves it out.
if [[ "${SKIP_CUDA_BUILD:-0}" != 1 ]]; then
    say "building the model server with --features cuda (scripts/cuda-build-check.sh)"
    scripts/cuda-build-check.sh
fi
