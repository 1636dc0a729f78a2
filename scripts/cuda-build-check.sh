#!/usr/bin/env bash
# Builds the model server with `--features cuda` on a machine with no GPU and no CUDA toolkit: NVIDIA's compiler,
# headers and CUDA runtime come from PyPI (scripts/requirements-cuda.txt). The other libraries the binary links to
# (the driver's libcuda, NVRTC, cuBLAS, cuRAND) are only needed to link here, so, like the `stubs` directory of
# NVIDIA's toolkit, link stubs stand in for them: shared libraries with the real names and sonames that export
# every function cudarc declares. The binary is not run here (it needs the real libraries and a GPU);
# scripts/gpu-check.sh does that on a machine with one. The depthwise kernel, which NVRTC compiles at run time,
# is compiled to PTX with nvcc first.
#
#   scripts/cuda-build-check.sh
#
# Needs python3 with pip (the toolkit goes to .cache/cuda-toolkit/), gcc and cargo. CUDA_COMPUTE_CAP (default 80)
# is the GPU generation candle's kernels are compiled for, which no GPU can tell here. Honours CARGO_TARGET_DIR.
# candle's kernels are compiled without device-code optimisation (NVCC_APPEND_FLAGS), which halves nvcc's time:
# this binary only proves that everything compiles and links.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'cuda-build-check: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

toolkit="$root/.cache/cuda-toolkit"
stamp="$toolkit/requirements.txt"
if ! cmp -s scripts/requirements-cuda.txt "$stamp"; then
    say "installing the CUDA compiler and headers from PyPI into $toolkit"
    rm -rf "$toolkit"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$toolkit" \
        -r scripts/requirements-cuda.txt
    cp scripts/requirements-cuda.txt "$stamp"
fi
cuda="$toolkit/nvidia/cu13"
[[ -x "$cuda/bin/nvcc" ]] || die "$cuda/bin/nvcc is missing after the install"
# candle's kernels link against libcudart by its unversioned name, which only a system toolkit provides.
ln -sf libcudart.so.13 "$cuda/lib/libcudart.so"
export PATH="$cuda/bin:$PATH"
export LIBRARY_PATH="$cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
say "$(nvcc --version | tail -1), compute capability $CUDA_COMPUTE_CAP"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The kernel NVRTC compiles at run time, through nvcc now: a syntax or type error shows here, not on a GPU.
nvcc --ptx -arch=compute_75 -o "$work/depthwise.ptx" model-server/src/kernels/depthwise.cu
grep -q '\.entry depthwise_nhwc_f32' "$work/depthwise.ptx" || die "the PTX has no depthwise_nhwc_f32 entry"
say "depthwise.cu compiles to PTX"

# Link stubs: every `pub unsafe fn` of cudarc's bindings for a library, as an empty exported function.
cudarc="$(cargo metadata --locked --format-version 1 --features model-server/cuda | python3 -c '
import json, sys
print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')"
stubs="$work/stubs"
mkdir -p "$stubs"
for spec in cuda:driver:1 nvrtc:nvrtc:13 curand:curand:10 cublas:cublas:13 cublasLt:cublaslt:13; do
    IFS=: read -r lib module major <<<"$spec"
    # A function declared once per CUDA version appears several times: one stub each.
    sed -n 's/^pub unsafe fn \([A-Za-z0-9_]*\)(.*/void \1(void) {}/p' "$cudarc/src/$module/sys/mod.rs" |
        sort -u >"$stubs/$lib.c"
    [[ -s "$stubs/$lib.c" ]] || die "no functions found in $cudarc/src/$module/sys/mod.rs"
    gcc -shared -fPIC -w -Wl,-soname,"lib$lib.so.$major" -o "$stubs/lib$lib.so" "$stubs/$lib.c"
done
export LIBRARY_PATH="$stubs:$LIBRARY_PATH"
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xcicc -O0 -Xptxas -O0"

# The libraries, binaries and the CUDA test with `--features cuda`, through the same command as the test build
# (scripts/test.sh): features then unify as they did there, so only what depends on candle is compiled again,
# where `cargo build -p model-server --features cuda` would compile most dependencies a second time (about 18
# minutes on 2 cores, against about 7). Every crate is compiled with CUDA; of the test binaries only those that
# prove something here are linked (each one carries the whole of candle, and all of them twice over would take
# gigabytes of disk for nothing the CPU build's have not shown).
say "cargo test --workspace --no-run --features model-server/cuda --lib --bins --test cuda"
cargo test --workspace --locked --no-run --features model-server/cuda --lib --bins --test cuda
target_dir="${CARGO_TARGET_DIR:-$root/target}"
needed="$(readelf -d "$target_dir/debug/model-server" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
for lib in libcuda.so.1 libnvrtc.so.13 libcublas.so.13 libcudart.so.13; do
    [[ " $needed" == *" $lib "* ]] || die "the CUDA binary does not link $lib (it links: $needed)"
done
say "ok: model-server built with CUDA; it links $needed"
