#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, the CUDA toolkit (nvcc) and the driver: builds the model server with
# `--features cuda`, runs the GPU tests, then measures the model and the model server on the GPU.
#
#   scripts/gpu-check.sh [--out DIR]      (default DIR: gpu-check/ at the repository root)
#
# The tests (model-server/tests/cuda.rs): the depthwise CUDA kernel against the CPU kernel on random shapes;
# f32 logits within 1e-3 of the golden ones (synthetic input and the four photos); f16 and bf16 with the golden
# top-1 class on every photo, their largest distance to the golden logits printed. Then the benchmark of the
# speed work on the GPU: model compute at batch 1 and 8 in f32, f16 and bf16, and the model server under the
# load generator over gRPC at concurrency 1, 4 and 16 with its GPU batching defaults. Everything printed is
# kept in DIR. CUDA_COMPUTE_CAP overrides the compute capability read from nvidia-smi.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'gpu-check: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

out="$root/gpu-check"
while (($#)); do
    case "$1" in
        --out) out="$2"; shift ;;
        *) die "unknown argument $1 (use --out DIR)" ;;
    esac
    shift
done
mkdir -p "$out"

command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU and its driver"
command -v nvcc >/dev/null || die "nvcc not found: put the CUDA toolkit's bin/ on PATH"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
nvcc --version | tail -1 | tee -a "$out/gpu.txt"
cap="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.[:space:]')}"
[[ "$cap" =~ ^[0-9]+$ ]] || die "cannot read the compute capability from nvidia-smi; set CUDA_COMPUTE_CAP (e.g. 86)"
export CUDA_COMPUTE_CAP="$cap"
say "compute capability $CUDA_COMPUTE_CAP"

scripts/setup-model-repository.sh
export MODEL_REPOSITORY="$root/model-repository"

say "building with --features cuda (release)"
cargo build --release --locked -p model-server --features cuda --bins
cargo build --release --locked -p loadtest

say "GPU tests"
cargo test --release --locked -p model-server --features cuda --test cuda -- --nocapture --test-threads=1 \
    2>&1 | tee "$out/tests.txt"
# The device and batching-default rules, now with a GPU that really opens.
cargo test --release --locked -p model-server --features cuda --lib config 2>&1 | tee -a "$out/tests.txt"

say "model compute on the GPU"
for dtype in f32 f16 bf16; do
    cargo bench --locked -p model-server --features cuda --bench inference -- \
        --device cuda --dtype "$dtype" --batches 1,8,32 --json "$out/compute-$dtype.json" \
        2>&1 | tee -a "$out/compute.txt"
done

say "the model server on the GPU under load"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc="$(port)"
target/release/model-server --device cuda --grpc-addr "127.0.0.1:$grpc" --http-addr "127.0.0.1:$(port)" \
    >"$out/model-server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    target/release/model-server healthcheck --addr "127.0.0.1:$grpc" --timeout-secs 1 >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || die "the model server exited; see $out/model-server.log"
    sleep 0.2
done
for c in 1 4 16; do
    say "gRPC, concurrency $c"
    target/release/loadtest grpc --server "http://127.0.0.1:$grpc" --image testdata/golden/coffee.png \
        --concurrency "$c" --duration 20s --warmup 3s | tee "$out/grpc-c$c.txt"
done
say "done; results in $out"
