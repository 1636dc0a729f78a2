#!/usr/bin/env bash
# Runs Triton's perf_analyzer, from the tritonclient 2.51.0 wheel, with the arguments given:
#
#   scripts/perf-analyzer.sh -m efficientnet-lite0 -u localhost:8001 -i grpc --concurrency-range 1:2
#
# The first run installs it into .cache/perf-analyzer (a virtual environment of its own, as the test suite's
# tritonclient is newer) with the CUDA runtime wheel, whose libcudart the binary links even with no GPU, and
# Debian's libb64-0d. `--install-only` stops after that.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/.cache/perf-analyzer"
say() { printf 'perf-analyzer.sh: %s\n' "$*" >&2; }

if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    say "installing libb64-0d"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null
fi

if [[ ! -x "$dir/venv/bin/perf_analyzer" ]]; then
    say "installing tritonclient 2.51.0 and the CUDA runtime into ${dir#"$root"/}"
    python3 -m venv "$dir/venv"
    "$dir/venv/bin/pip" install --quiet --disable-pip-version-check \
        'tritonclient[grpc]==2.51.0' 'nvidia-cuda-runtime-cu12==12.6.77'
fi

[[ "${1:-}" == --install-only ]] && exit 0

cudart="$("$dir/venv/bin/python" -c 'import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], "lib"))')"
export LD_LIBRARY_PATH="$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$dir/venv/bin/perf_analyzer" "$@"
