#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need
# (Debian packages, a Python virtual environment with tritonclient), creates
# the model repository, then runs `cargo test` for the workspace.
#
#   scripts/test.sh [extra cargo test arguments]
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

# Python: tritonclient[grpc] is the third-party client of the interop test.
if ! .venv/bin/python -c 'import tritonclient.grpc, numpy' >/dev/null 2>&1; then
    say "creating .venv with tritonclient[grpc] and numpy"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
fi

# The model repository, built with the same profile as the tests so that
# CI compiles the workspace once.
SETUP_CARGO_PROFILE=dev scripts/setup-model-repository.sh

export OIP_PYTHON="$root/.venv/bin/python"
say "running cargo test"
cargo test --workspace --locked "$@"
