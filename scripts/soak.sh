#!/usr/bin/env bash
# Runs the whole stack (model server and gateway, release build) under mixed traffic for a long time and writes
# SOAK.md from what it measured: each interval, the load's throughput, p99 and errors by kind, and both servers'
# resident memory and open file descriptors. The traffic is `loadtest mixed`: /test, uploads to /predict and
# /detect, predict by URL, and requests that must be refused without harm (bytes that are no image, a URL that
# answers 404, a URL that never answers). The run passes when
#   - no response is a 5xx or transport error other than the 502 and 504 the bad URLs must get,
#   - each server's RSS over the last 10 minutes stays within 10 % of its RSS at the 10-minute mark,
#   - the open file descriptors at the end are no more than at the first sample, give or take a few.
#
#   scripts/soak.sh [--duration 30m] [--interval 60s] [--rate 40] [--out SOAK.md] [--smoke]
#
# --smoke: a few seconds-long intervals with the test build (CI runs this to prove the script); it writes
# target/soak/SOAK.md unless --out says otherwise and checks only the errors. Nothing else should run on the
# machine during a real run.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'soak.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

smoke=false duration=30m interval=60s rate=40 out=""
while (($#)); do
    case "$1" in
        --smoke) smoke=true ;;
        --duration) duration="${2:?--duration needs a value}"; shift ;;
        --interval) interval="${2:?--interval needs a value}"; shift ;;
        --rate) rate="${2:?--rate needs a value}"; shift ;;
        --out) out="${2:?--out needs a file}"; shift ;;
        *) die "unknown argument $1 (use --duration, --interval, --rate, --out, --smoke)" ;;
    esac
    shift
done
seconds() {
    case "$1" in
        *h) echo $((${1%h} * 3600)) ;;
        *m) echo $((${1%m} * 60)) ;;
        *s) echo "${1%s}" ;;
        *) echo "$1" ;;
    esac
}

target_dir="${CARGO_TARGET_DIR:-$root/target}"
work="$target_dir/soak"
rm -rf "$work"
mkdir -p "$work/intervals"
if $smoke; then
    bin_dir="$target_dir/debug" duration=6s interval=3s rate=5
    out="${out:-$work/SOAK.md}"
    cargo test --workspace --locked --no-run >/dev/null
else
    bin_dir="$target_dir/release"
    out="${out:-$root/SOAK.md}"
    cargo build --locked --release -p model-server -p gateway -p loadtest --bins
fi
total_s="$(seconds "$duration")" interval_s="$(seconds "$interval")"
intervals=$((total_s / interval_s))
((intervals >= 1)) || die "--duration must be at least one --interval"

: "${MODEL_REPOSITORY:=$root/model-repository}"
export MODEL_REPOSITORY
[[ -d "$MODEL_REPOSITORY/efficientnet-lite0" && -d "$MODEL_REPOSITORY/yolov3-tiny" ]] ||
    MAKE_MODEL_REPOSITORY="$bin_dir/make-model-repository" scripts/setup-model-repository.sh

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

grpc="$(free_port)" http="$(free_port)"
"$bin_dir/model-server" --model-repository "$MODEL_REPOSITORY" --grpc-addr "127.0.0.1:$grpc" \
    --http-addr "127.0.0.1:$http" >"$work/model-server.log" 2>&1 &
ms_pid=$!
pids+=("$ms_pid")
port="$(free_port)"
# Fetches give up after 2 s, so the URL that never answers costs a worker 2 s, not 15.
"$bin_dir/gateway" --listen "127.0.0.1:$port" --model-server "http://127.0.0.1:$grpc" --fetch-allow 127.0.0.0/8 \
    --fetch-timeout-ms 2000 --fetch-connect-timeout-ms 1000 >"$work/gateway.log" 2>&1 &
gw_pid=$!
pids+=("$gw_pid")
for _ in $(seq 1 3000); do
    curl -fsS "http://127.0.0.1:$http/v2/health/ready" >/dev/null 2>&1 &&
        curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    kill -0 "$ms_pid" 2>/dev/null || die "the model server exited; see $work/model-server.log"
    kill -0 "$gw_pid" 2>/dev/null || die "the gateway exited; see $work/gateway.log"
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || die "the stack was not ready within 5 minutes"

# The golden photos: uploaded, and served by loadtest for the URL requests.
images="$work/images"
mkdir -p "$images"
cp testdata/golden/chelsea.png testdata/golden/coffee.png "$images/"

sample() {
    local pid="$1"
    printf '{"rss_kib": %s, "fds": %s}' \
        "$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$pid/status")" \
        "$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)"
}
say "$intervals intervals of $interval at $rate requests/s: gateway :$port, model server :$grpc"
started="$(date +%s)"
for i in $(seq 1 "$intervals"); do
    # The load of one interval, then both servers' memory and descriptors at its end: one row of the report.
    "$bin_dir/loadtest" mixed --gateway "http://127.0.0.1:$port" --images "$images" --rate "$rate" \
        --concurrency 64 --duration "$interval" --timeout 30s --json >"$work/intervals/$i.load.json"
    kill -0 "$ms_pid" 2>/dev/null || die "the model server died; see $work/model-server.log"
    kill -0 "$gw_pid" 2>/dev/null || die "the gateway died; see $work/gateway.log"
    printf '{"interval": %d, "elapsed_s": %d, "gateway": %s, "model_server": %s}\n' "$i" \
        "$(($(date +%s) - started))" "$(sample "$gw_pid")" "$(sample "$ms_pid")" >"$work/intervals/$i.servers.json"
    say "interval $i/$intervals done"
done

cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
args=(--cpu "$cpu" --cores "$(nproc)" --commit "$commit" --duration "$duration" --interval "$interval" --rate "$rate")
$smoke && args+=(--smoke)
python3 scripts/soak-report.py "$work/intervals" --out "$out" "${args[@]}"
