#!/usr/bin/env bash
# Runs the whole service on this machine: creates the model repository if
# needed, builds in release mode, starts the model server (gRPC on :8001) and
# the gateway (HTTP on :8080). Ctrl-C stops both.
#
#   scripts/run.sh
# Configuration is by environment variables (see README), e.g.
#   INFERENCE_THREADS=4 LISTEN=127.0.0.1:9090 scripts/run.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'run.sh: %s\n' "$*" >&2; }

scripts/setup-model-repository.sh
say "building (release; the first build takes several minutes)"
cargo build --release --locked -p model-server -p gateway
target="${CARGO_TARGET_DIR:-$root/target}/release"

"$target/model-server" --model-repository "${MODEL_REPOSITORY:-$root/model-repository}" &
model_server=$!
trap 'kill "$model_server" 2>/dev/null; wait "$model_server" 2>/dev/null' EXIT INT TERM
say "model server starting (pid $model_server); gateway on ${LISTEN:-0.0.0.0:8080}: open http://localhost:8080/"
"$target/gateway"
