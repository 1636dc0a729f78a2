#!/usr/bin/env bash
# Measures the service on this machine in one run and writes BENCHMARKS.md from what it measured, with SVG charts of
# the comparison with the Python app in bench/ beside it:
#   1. model compute, ours (cargo bench --bench inference) against onnxruntime on the same ONNX model,
#      batch 1 latency and batch 8 throughput, 1 and 2 threads;
#      then the detector, YOLOv3-tiny, ours against OpenCV's dnn module on the official darknet files, 2 threads;
#   2. the model server alone over gRPC under loadtest, concurrency 1, 4 and 16, batching off and on;
#   3. gateway + model server under loadtest at concurrency 1 and 10, on /test and on predict-by-URL (a 500x375
#      JPEG served from loopback), with the gateway's own share of the latency, and on /detect (the detector's
#      golden photos uploaded);
#      then /test again with the other layout: one instance of every thread, batches of up to 8 (--instances 1);
#      on a CPU with AVX512-BF16, compute and /test once more with the opt-in --dtype bf16;
#   4. peak RSS of each server, and the model server's cold start to ready;
#   5. wrk against /test at concurrency 10, to check (3) with a load generator we did not write;
#   6. the Python app of bench/baseline (Flask + gunicorn + onnxruntime on the ONNX export of the same weights), under
#      the same loadtest runs as (3) and the same wrk run as (5), each right after ours.
# Ours and its baseline are measured in turns, not one after the other: see compute_round and paired_runs.
#
#   scripts/bench.sh [--smoke] [--out FILE]
#
# --smoke: seconds-long runs with the dev-profile binaries the tests already built, to prove the script works (CI
# runs this); it writes target/bench/BENCHMARKS.md unless --out says otherwise, and its numbers mean nothing.
# Environment: ORT_MODEL, the ONNX file for onnxruntime and the Python app (default: the reference export beside the
# checkout, ../shared/reference/efficientnet_lite0.onnx; without one, part 1 has our numbers only and part 6 is
# skipped). BENCH_DURATION and BENCH_TRIALS override the load-test duration and the compute trials. The Python app's
# virtual environment is kept in .cache/baseline-venv and reused.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'bench.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

smoke=false
out=""
while (($#)); do
    case "$1" in
        --smoke) smoke=true ;;
        --out) out="${2:?--out needs a file}"; shift ;;
        *) die "unknown argument $1 (use --smoke, --out FILE)" ;;
    esac
    shift
done

target_dir="${CARGO_TARGET_DIR:-$root/target}"
work="$target_dir/bench"
rm -rf "$work"
mkdir -p "$work/results" "$work/images"
if $smoke; then
    profile=dev bin_dir="$target_dir/debug"
    duration="${BENCH_DURATION:-2s}" warmup=0s runs=2 trials="${BENCH_TRIALS:-1}" wrk_duration=2s
    out="${out:-$work/BENCHMARKS.md}"
else
    profile=release bin_dir="$target_dir/release"
    duration="${BENCH_DURATION:-20s}" warmup=3s runs=20 trials="${BENCH_TRIALS:-5}" wrk_duration=30s
    out="${out:-$root/BENCHMARKS.md}"
fi
threads=2
model=efficientnet-lite0
ort_model="${ORT_MODEL:-$root/../shared/reference/efficientnet_lite0.onnx}"
baseline=false
[[ -f "$ort_model" ]] && baseline=true
# The opt-in reduced precision runs where the model server accepts it: AVX512-BF16, detected as the server does.
bf16=false
grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null && bf16=true
baseline_venv="$root/.cache/baseline-venv"

# ---- tools ----------------------------------------------------------------------------------------------------
if ! command -v wrk >/dev/null 2>&1; then
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    say "installing wrk"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends wrk >/dev/null
fi
if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv"
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-bench.txt
py=.venv/bin/python
if $baseline; then
    # The Python app's own pinned versions, apart from ours; pip returns at once when they are already there.
    if [[ ! -x "$baseline_venv/bin/python" ]]; then
        say "creating $baseline_venv for the Python app"
        python3 -m venv "$baseline_venv"
    fi
    "$baseline_venv/bin/pip" install --quiet --disable-pip-version-check -r bench/baseline/requirements.txt
fi

say "building ($profile)"
cargo_profile=(--profile "$profile")
if $smoke; then
    # The tests' own build: the same command and features, so nothing is compiled again.
    cargo test --workspace --locked --no-run >/dev/null
else
    cargo build --locked "${cargo_profile[@]}" -p model-server -p gateway -p loadtest --bins
fi
# --workspace, not -p model-server: features unify as in the tests' build, so smoke mode compiles only the bench.
cargo bench --locked "${cargo_profile[@]}" --workspace --bench inference --no-run
MAKE_MODEL_REPOSITORY="$bin_dir/make-model-repository" scripts/setup-model-repository.sh
export MODEL_REPOSITORY="$root/model-repository"

# ---- machine --------------------------------------------------------------------------------------------------
# The CPU as lscpu names it, its cache sizes, and the instruction-set extensions the kernels (ours and onnxruntime's)
# choose from, as /proc/cpuinfo names them (x86 "flags", Arm "Features").
$py - "$work/results/machine.json" "$(LC_ALL=C lscpu)" "$(nproc)" "$smoke" "$duration" "$trials" "$runs" <<'EOF'
import json, os, platform, re, subprocess, sys, datetime
path, lscpu, cores, smoke, duration, trials, runs = sys.argv[1:]
def lscpu_field(name):
    m = re.search(rf"^{re.escape(name)}:\s*(.+)$", lscpu, re.M)
    return m.group(1).strip() if m else None
SIMD = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512dq", "avx512bw", "avx512vl",
        "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimdhp",
        "asimddp", "sve", "sve2", "bf16", "i8mm"]
cpu_flags = set()
for line in open("/proc/cpuinfo"):
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
        cpu_flags = set(value.split())
        break
mem_kib = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")))
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
json.dump(dict(cpu=lscpu_field("Model name") or platform.processor(), cpu_flags=[f for f in SIMD if f in cpu_flags],
               l2_cache=lscpu_field("L2 cache"), l3_cache=lscpu_field("L3 cache"), cores=int(cores),
               memory_gib=round(mem_kib / 2**20, 1), kernel=platform.release(),
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               commit=commit, rustc=rustc, smoke=smoke == "true", duration=duration, trials=int(trials),
               runs=int(runs)), open(path, "w"), indent=2)
EOF

# ---- 1. model compute -----------------------------------------------------------------------------------------
# In rounds, one trial of each side per round, ours and its baseline back to back: on a shared machine the speed of
# the cores drifts over minutes, and a side measured all at once, minutes after the other, would carry that drift
# into the ratio. Each round writes its own files; merge_rounds pools their trial medians.
compute_round() {
    local dir="$1" t
    mkdir -p "$dir"
    for t in 1 2; do
        cargo bench --locked "${cargo_profile[@]}" --workspace --bench inference -- \
            --threads "$t" --runs "$runs" --trials 1 --batches 1,8 --json "$dir/compute-ours-t$t.json"
    done
    if $bf16; then
        cargo bench --locked "${cargo_profile[@]}" --workspace --bench inference -- --dtype bf16 \
            --threads "$threads" --runs "$runs" --trials 1 --batches 1,8 --json "$dir/compute-ours-bf16-t$threads.json"
    fi
    if $baseline; then
        $py scripts/bench-ort.py "$ort_model" --threads 1,2 --runs "$runs" --trials 1 --out-dir "$dir"
    fi
    # The detector with 2 threads: ours on the project's kernels, OpenCV's dnn module on the same darknet files.
    cargo bench --locked "${cargo_profile[@]}" --workspace --bench inference -- --model yolov3-tiny \
        --threads "$threads" --runs "$runs" --trials 1 --batches 1,8 --json "$dir/compute-yolo-ours-t$threads.json"
    $py scripts/bench-opencv.py .cache/yolov3-tiny --threads "$threads" --runs "$runs" --trials 1 --out-dir "$dir"
}

# Pools every round's file of each name in DIR/*/ into RESULTS/NAME: all trial medians, their median, and the
# images per second at that median.
merge_rounds() {
    $py - "$1" "$2" <<'EOF'
import json, pathlib, statistics, sys
rounds, results = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dirs = sorted(d for d in rounds.iterdir() if d.is_dir())
for name in sorted({f.name for d in dirs for f in d.glob("*.json")}):
    parts = [json.loads((d / name).read_text()) for d in dirs if (d / name).exists()]
    merged = dict(parts[0], trials=sum(p["trials"] for p in parts))
    for i, r in enumerate(merged["results"]):
        medians = [m for p in parts for m in p["results"][i]["trial_medians_ms"]]
        median = statistics.median(medians)
        merged["results"][i] = dict(r, median_ms=median, trial_medians_ms=medians, images_per_s=r["batch"] * 1e3 / median)
    (results / name).write_text(json.dumps(merged, indent=2))
EOF
}

$baseline || say "no ONNX model at $ort_model: onnxruntime not measured (set ORT_MODEL)"
for r in $(seq 1 "$trials"); do
    say "compute: round $r of $trials (ours, then onnxruntime; the detector, then OpenCV)"
    compute_round "$work/rounds/$r"
done
merge_rounds "$work/rounds" "$work/results"
$baseline && printf '%s\n' "$(basename "$ort_model")" >"$work/results/ort-model.txt"

# ---- servers --------------------------------------------------------------------------------------------------
free_port() { $py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
pgroups=()
cleanup() {
    for g in "${pgroups[@]}"; do stop_group "$g"; done
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# Starts a model server with the given extra flags; sets ms_pid, ms_grpc, ms_ready_ms (start to SERVING).
start_model_server() {
    local grpc started
    grpc="$(free_port)"
    started="$(date +%s%N)"
    "$bin_dir/model-server" --model-repository "$MODEL_REPOSITORY" --grpc-addr "127.0.0.1:$grpc" \
        --http-addr "127.0.0.1:$(free_port)" --threads "$threads" "$@" >>"$work/model-server.log" 2>&1 &
    ms_pid=$!
    pids+=("$ms_pid")
    for _ in $(seq 1 3000); do
        # The server's own probe (grpc.health.v1): SERVING once the model is loaded and warmed up.
        if "$bin_dir/model-server" healthcheck --addr "127.0.0.1:$grpc" --timeout-secs 1 >/dev/null 2>&1; then
            ms_ready_ms=$((($(date +%s%N) - started) / 1000000))
            ms_grpc="http://127.0.0.1:$grpc"
            return 0
        fi
        kill -0 "$ms_pid" 2>/dev/null || die "the model server exited; see $work/model-server.log"
        sleep 0.02
    done
    die "the model server was not ready within 60 s; see $work/model-server.log"
}

# Peak resident memory of a process in KiB.
peak_rss_kib() { sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status"; }

stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# Stops a process group whose leader is our child: SIGTERM to every member, then SIGKILL to whatever is left after
# 10 s, so no worker outlives the script.
stop_group() {
    kill -TERM -- "-$1" 2>/dev/null || true
    for _ in $(seq 1 500); do
        kill -0 -- "-$1" 2>/dev/null || break
        sleep 0.02
    done
    kill -KILL -- "-$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

loadtest() { "$bin_dir/loadtest" "$@" --duration "$duration" --warmup "$warmup" --json; }

# Waits until URL answers 2xx while process PID lives; dies after SECONDS, or when it exits, naming LOG.
wait_http() {
    local url="$1" pid="$2" what="$3" log="$4" seconds="$5"
    for _ in $(seq 1 $((seconds * 50))); do
        curl -fsS "$url" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || die "$what exited; see $log"
        sleep 0.02
    done
    die "$what was not ready within $seconds s; see $log"
}

# The gateway in front of the model server last started, on a free port: sets gw_pid and gateway (its URL).
start_gateway() {
    local port
    port="$(free_port)"
    "$bin_dir/gateway" --listen "127.0.0.1:$port" --model-server "$ms_grpc" --fetch-allow 127.0.0.0/8 \
        >>"$work/gateway.log" 2>&1 &
    gw_pid=$!
    pids+=("$gw_pid")
    gateway="http://127.0.0.1:$port"
    wait_http "$gateway/readyz" "$gw_pid" "the gateway" "$work/gateway.log" 30
}

# One loadtest run of KIND (test or url) at concurrency C against the server at URL, into results/NAME-KIND-cC.json.
http_run() {
    local url="$1" name="$2" kind="$3" c="$4"
    case "$kind" in
        test) loadtest test --gateway "$url" --concurrency "$c" ;;
        url) loadtest predict-url --gateway "$url" --serve-dir "$work/images" --concurrency "$c" ;;
    esac >"$work/results/$name-$kind-c$c.json"
}

# The HTTP runs of (3), (5) and (6): loadtest on /test and predict-by-URL at concurrency 1 and 10, then wrk on /test
# at concurrency 10, each on our stack (results stack-*) and then at once the same on the Python app (baseline-*)
# when it runs, so that both sides of every ratio are measured within a minute of each other.
paired_runs() {
    local c kind label side
    local -A url=([stack]="$gateway") who=([stack]=stack)
    $baseline && url[baseline]="$bl" who[baseline]="Python app"
    local sides=(stack)
    $baseline && sides+=(baseline)
    for c in 1 10; do
        for kind in test url; do
            label=/test
            [[ "$kind" == url ]] && label="predict by URL"
            for side in "${sides[@]}"; do
                say "${who[$side]}: $label, concurrency $c"
                http_run "${url[$side]}" "$side" "$kind" "$c"
            done
        done
    done
    for side in "${sides[@]}"; do
        say "${who[$side]}: wrk on /test, concurrency 10"
        wrk -t 2 -c 10 -d "$wrk_duration" --latency "${url[$side]}/test" >"$work/results/wrk-$side-test-c10.txt"
    done
}

# ---- 2. the model server alone --------------------------------------------------------------------------------
# Batching itself, on one instance of every thread: off, one image per execution; on, up to 8, whatever is waiting
# when the model gets free (no extra delay: with every core busy, waiting for a fuller batch only adds latency).
for mode in off on; do
    case "$mode" in
        off) flags=(--instances 1 --max-batch-size 1) ;;
        on) flags=(--instances 1 --max-batch-size 8 --max-queue-delay 0) ;;
    esac
    say "model server, batching $mode"
    start_model_server "${flags[@]}"
    [[ "$mode" == off ]] && printf '{"cold_start_ms": %s}\n' "$ms_ready_ms" >"$work/results/cold-start.json"
    for c in 1 4 16; do
        say "  gRPC, concurrency $c"
        loadtest grpc --server "$ms_grpc" --model "$model" --image testdata/golden/coffee.png \
            --concurrency "$c" >"$work/results/grpc-batching-$mode-c$c.json"
    done
    printf '{"peak_rss_kib": %s}\n' "$(peak_rss_kib "$ms_pid")" >"$work/results/rss-model-server-$mode.json"
    stop "$ms_pid"
done

# ---- 3 and 5. the whole stack ---------------------------------------------------------------------------------
# A 500x375 JPEG, the size the gateway-overhead target is stated for.
$py - testdata/golden/coffee.png "$work/images/coffee-500x375.jpg" <<'EOF'
import sys
from PIL import Image
Image.open(sys.argv[1]).convert("RGB").resize((500, 375), Image.LANCZOS).save(sys.argv[2], quality=90)
EOF
# The Python app: bench/baseline as its README runs it, on the ONNX export of the same weights. One gunicorn worker
# per inference thread of ours, each with one onnxruntime thread (on 2 cores: one worker per core, its README's
# default), so both sides compute on the same number of threads. setsid makes gunicorn the leader of its own process
# group (a background job of this non-interactive script is never a group leader, so setsid does not fork and $! is
# gunicorn itself), so stopping the group stops every worker. It idles while ours is measured, as ours idles while
# it is: a sync worker waiting on its socket and our servers waiting on theirs take no CPU.
start_baseline() {
    bl_port="$(free_port)"
    say "Python app: starting bench/baseline on port $bl_port"
    started="$(date +%s%N)"
    env -u ORT_INTRA_OP_THREADS -u LABELS_PATH -u TEST_IMAGE -u TOP_K WORKERS="$threads" \
        VENV="$baseline_venv" MODEL_PATH="$ort_model" setsid bench/baseline/run.sh "$bl_port" \
        >>"$work/baseline.log" 2>&1 &
    bl_pid=$!
    pgroups+=("$bl_pid")
    bl="http://127.0.0.1:$bl_port"
    wait_http "$bl/health" "$bl_pid" "the Python app" "$work/baseline.log" 60
    bl_ready_ms=$((($(date +%s%N) - started) / 1000000))
    [[ "$(ps -o pgid= -p "$bl_pid" | tr -d ' ')" == "$bl_pid" ]] \
        || die "the Python app does not lead its own process group"
}

# Records the Python app's start-up time, versions and peak RSS (gunicorn and its workers summed: each worker holds
# its own copy of the model), then stops it.
stop_baseline() {
    local bl_rss=0 bl_procs=0 p rss
    for p in $(pgrep -g "$bl_pid"); do
        rss="$(peak_rss_kib "$p" 2>/dev/null || true)"
        [[ -n "$rss" ]] || continue
        bl_rss=$((bl_rss + rss)) bl_procs=$((bl_procs + 1))
    done
    "$baseline_venv/bin/python" - "$work/results/baseline.json" "$bl_ready_ms" "$bl_rss" "$((bl_procs - 1))" \
        "$(basename "$ort_model")" <<'EOF'
import json, platform, sys
from importlib.metadata import version
path, ready_ms, rss_kib, workers, model = sys.argv[1:]
json.dump(dict(ready_ms=int(ready_ms), peak_rss_kib=int(rss_kib), workers=int(workers), ort_threads=1, model=model,
               python=platform.python_version(),
               versions={p: version(p) for p in ("flask", "gunicorn", "onnxruntime", "numpy", "pillow", "requests")}),
          open(path, "w"), indent=2)
EOF
    stop_group "$bl_pid"
    pgroups=()
}

# The default layout: an instance per inference thread, a lone request borrowing the idle instances' threads.
start_model_server
start_gateway
if $baseline; then
    start_baseline
else
    say "no ONNX model at $ort_model: skipping the Python app (bench/baseline; set ORT_MODEL)"
fi
paired_runs
$baseline && stop_baseline
for c in 1 10; do
    say "stack: detect by upload, concurrency $c"
    loadtest predict-upload --route detect --gateway "$gateway" --images testdata/yolo/images --concurrency "$c" \
        >"$work/results/stack-detect-c$c.json"
done
printf '{"peak_rss_kib": %s}\n' "$(peak_rss_kib "$gw_pid")" >"$work/results/rss-gateway.json"
printf '{"peak_rss_kib": %s}\n' "$(peak_rss_kib "$ms_pid")" >"$work/results/rss-model-server-stack.json"
stop "$gw_pid"
stop "$ms_pid"

# The stack again with the model server's FLAGS, on /test only at concurrency 1 and 10: results NAME-test-c*.json.
test_variant() {
    local name="$1" what="$2" c
    shift 2
    start_model_server "$@"
    start_gateway
    for c in 1 10; do
        say "stack, $what: /test, concurrency $c"
        http_run "$gateway" "$name" test "$c"
    done
    stop "$gw_pid"
    stop "$ms_pid"
}
# The other layout the README weighs: one instance of every thread, batches of up to 8.
test_variant one-instance "one instance of $threads threads" --instances 1 --max-batch-size 8 --max-queue-delay 0
# The default layout with bf16 weights and activations (f32 accumulation), where the CPU has it.
if $bf16; then
    test_variant bf16 bf16 --dtype bf16
fi

# ---- report ---------------------------------------------------------------------------------------------------
# The charts go to bench/ beside $out: target/bench/bench/ in smoke mode, so the committed ones stay as they are.
$py scripts/bench-report.py "$work/results" --out "$out"
say "wrote $out and its charts in $(dirname "$out")/bench/"
