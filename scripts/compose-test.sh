#!/usr/bin/env bash
# The containers end to end: builds both images, `compose up`, a correct prediction for each golden photo
# through the published gateway, `--scale model-server=3` with predictions still correct, one replica killed
# under load with no failed request, then `compose down -v`.
#
#   scripts/compose-test.sh        (scripts/test.sh runs it when a Docker engine answers)
#
# It must work on a machine whose Docker engine cannot pull from any registry, so it builds the images a
# little differently from a user's `docker compose build`, from the same Dockerfile:
#   1. RUNTIME_IMAGE: instead of debian:bookworm-slim, a Debian 12 base made here with debootstrap from the
#      machine's own Debian mirror (minbase variant plus ca-certificates, about what the slim image holds).
#   2. No Rust image to compile in: the Dockerfile is cut before its build stage, and two stages are added
#      that do what its `gateway` and `model-server-with-model` stages do, copying binaries compiled on this
#      host (Debian 12 too, so the same glibc) and the model repository scripts/setup-model-repository.sh made
#      here, instead of the build stage's. Everything else (user, health checks, entrypoints, environment,
#      ports) comes from the Dockerfile's own runtime stages.
#   3. Image tags under imageserve-test/ (compose.yaml reads GATEWAY_IMAGE and MODEL_SERVER_IMAGE), so a
#      user's own images are never replaced.
# Environment: IMAGE_PROFILE=release|dev (which cargo profile's binaries go in; default release; scripts/test.sh
# uses dev so CI compiles once), DEBIAN_MIRROR (default: the first Debian mirror in this machine's apt sources),
# COMPOSE_TLS=1 (the same with compose.tls.yaml: mutual TLS between the tiers, certificates made here).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'compose-test: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker engine answers 'docker info'"
if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose_cmd=(docker-compose)
else
    die "neither 'docker compose' nor 'docker-compose' is installed"
fi
sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)

project=imageserve-test
base_image=imageserve-test/debian:bookworm-slim
export GATEWAY_IMAGE=imageserve-test/gateway:0.1.0
export MODEL_SERVER_IMAGE=imageserve-test/model-server:0.1.0-with-model
files=(-f compose.yaml)
if [[ "${COMPOSE_TLS:-0}" == 1 ]]; then
    export CERTS_DIR="$root/target/compose-certs"
    rm -rf "$CERTS_DIR"
    scripts/make-certs.sh --for-containers "$CERTS_DIR" 2>/dev/null
    files+=(-f compose.tls.yaml)
fi
compose() { "${compose_cmd[@]}" -p "$project" "${files[@]}" "$@"; }

# ---- binaries and model repository from this host ------------------------------------------------------------
profile="${IMAGE_PROFILE:-release}"
case "$profile" in
    release) cargo build --release --locked -p model-server -p gateway --bins; built=target/release ;;
    # The same command as scripts/test.sh, so the same feature set: nothing is compiled again after the tests.
    dev) cargo test --workspace --locked --no-run; built=target/debug ;;
    *) die "IMAGE_PROFILE must be release or dev, not $profile" ;;
esac
built="${CARGO_TARGET_DIR:-$root/target}/${built#target/}"
SETUP_CARGO_PROFILE="$profile" scripts/setup-model-repository.sh
# The build context is the repository; .dockerignore lets target/docker-bin/ in for this. Debug info is
# stripped: it is most of a dev binary's size and the daemon would copy it into every layer.
bin_dir=target/docker-bin
mkdir -p "$bin_dir"
for b in gateway model-server make-model-repository; do
    objcopy --strip-debug "$built/$b" "$bin_dir/$b"
done

# ---- a Debian 12 base image without a registry -----------------------------------------------------------------
debian_mirror() {
    local uri
    uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/ && $i !~ /security/) { print $i; exit } }')"
    if [[ -z "$uri" ]]; then
        uri="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
            awk '$1 == "URIs:" && $2 !~ /security/ { print $2; exit }')"
    fi
    printf '%s' "$uri"
}
if ! docker image inspect "$base_image" >/dev/null 2>&1; then
    mirror="${DEBIAN_MIRROR:-$(debian_mirror)}"
    [[ -n "$mirror" ]] || die "no Debian mirror in this machine's apt sources: set DEBIAN_MIRROR"
    if ! command -v debootstrap >/dev/null 2>&1; then
        say "installing debootstrap"
        "${sudo[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    fi
    rootfs="$(mktemp -d)"
    trap '"${sudo[@]}" rm -rf "$rootfs"' EXIT
    say "making $base_image with debootstrap from $mirror"
    "${sudo[@]}" debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
    # What the official slim image leaves out too: package caches, documentation, locales.
    "${sudo[@]}" rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/info "$rootfs"/usr/share/locale
    "${sudo[@]}" tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' - "$base_image" >/dev/null
    "${sudo[@]}" rm -rf "$rootfs"
    trap - EXIT
fi

# ---- images ----------------------------------------------------------------------------------------------------
dockerfile="$bin_dir/Dockerfile"
{
    awk '/^# ---- the build/ { exit } { print }' Dockerfile
    cat <<EOF
FROM gateway-base AS gateway
COPY $bin_dir/gateway /usr/local/bin/gateway

FROM model-server-base AS model-server-with-model
COPY $bin_dir/model-server $bin_dir/make-model-repository /usr/local/bin/
COPY model-repository /models
EOF
} >"$dockerfile"
grep -q '^FROM runtime AS model-server-base' "$dockerfile" || die "Dockerfile has no model-server-base stage"
build_image() { # target tag
    say "building $2 (--target $1)"
    docker build --quiet -f "$dockerfile" --target "$1" --build-arg RUNTIME_IMAGE="$base_image" -t "$2" . >/dev/null
}
build_image gateway "$GATEWAY_IMAGE"
build_image model-server-with-model "$MODEL_SERVER_IMAGE"
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^imageserve-test/' >&2

# ---- compose ---------------------------------------------------------------------------------------------------
GATEWAY_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export GATEWAY_PORT
failed=true
cleanup() {
    if $failed; then
        say "failed; the last log lines of each service:"
        compose logs --no-color --tail 40 >&2 || true
    fi
    compose down -v --remove-orphans >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Posts a golden photo as base64 JSON; succeeds when the top-1 class and its probability match the golden
# top-5 (computed independently from the same photo). Prints the outcome.
predict() { # photo
    python3 - "$GATEWAY_PORT" "testdata/golden/$1" <<'EOF'
import base64, json, sys, urllib.request
port, stem = sys.argv[1], sys.argv[2]
golden = json.load(open(stem + ".top5.json"))["top5"][0]
body = json.dumps({"image": base64.b64encode(open(stem + ".png", "rb").read()).decode(), "top_k": 3}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", body, {"content-type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
except Exception as e:
    sys.exit(f"{stem}: {e}")
top = answer["predictions"][0]
ok = top["index"] == golden["index"] and top["label"] == golden["label"] and abs(top["probability"] - golden["prob"]) < 0.05
print(f"{stem.split('/')[-1]}: {top['label']} {top['probability']:.3f} (golden {golden['label']} {golden['prob']:.3f})"
      f" in {answer['timings_ms']['total']:.0f} ms{'' if ok else '  WRONG'}")
sys.exit(0 if ok else 1)
EOF
}

healthy_count() { # service
    local ids
    ids="$(compose ps -q "$1")"
    [[ -n "$ids" ]] || { echo 0; return; }
    # shellcheck disable=SC2086
    docker inspect -f '{{.State.Health.Status}}' $ids | grep -c '^healthy$' || true
}

wait_healthy() { # service count seconds
    local deadline=$((SECONDS + $3))
    until [[ "$(healthy_count "$1")" -ge "$2" ]]; do
        ((SECONDS < deadline)) || die "$1: fewer than $2 healthy container(s) after $3 s"
        sleep 1
    done
}

say "compose up (gateway published on 127.0.0.1:$GATEWAY_PORT)"
start=$(date +%s.%N)
compose up -d --no-build
deadline=$((SECONDS + 240))
until predict coffee >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { predict coffee || true; die "no correct prediction within 240 s of compose up"; }
    sleep 0.5
done
first=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
say "first correct prediction ${first} s after compose up"
wait_healthy gateway 1 60
wait_healthy model-server 1 60
for photo in coffee chelsea camera rocket; do predict "$photo"; done

say "scaling the model server to 3 replicas"
compose up -d --no-build --no-recreate --scale model-server=3
wait_healthy model-server 3 240
for round in 1 2 3; do
    for photo in coffee chelsea camera rocket; do predict "$photo"; done
done
compose ps >&2

# The fault: one replica killed (SIGKILL) under load. The gateway re-resolves the service name, balances over
# the replicas, retries a call that died with its replica on another one and ejects the dead one, so no
# client request may fail.
# awk, not head: head would close the pipe early, and under pipefail the SIGPIPE of `compose ps` fails the script.
victim="$(compose ps -q model-server | awk 'NR == 1')"
say "load at concurrency 6 for 20 s; docker kill ${victim:0:12} after 5 s"
python3 - "$GATEWAY_PORT" "$victim" <<'EOF'
import base64, collections, json, subprocess, sys, threading, time, urllib.request
port, victim = sys.argv[1], sys.argv[2]
image = base64.b64encode(open("testdata/golden/coffee.png", "rb").read()).decode()
body = json.dumps({"image": image, "top_k": 1}).encode()
outcomes, latencies, lock = collections.Counter(), [], threading.Lock()
start = time.monotonic()
def client():
    while time.monotonic() - start < 20:
        sent = time.monotonic()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", body, {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                top = json.load(response)["predictions"][0]
                outcome = "ok" if top["index"] == 967 else f"wrong class {top['label']}"
        except urllib.error.HTTPError as e:
            outcome = f"HTTP {e.code}: {e.read()[:200]!r}"
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"
        with lock:
            outcomes[outcome] += 1
            latencies.append(time.monotonic() - sent)
threads = [threading.Thread(target=client) for _ in range(6)]
for t in threads:
    t.start()
time.sleep(5)
subprocess.run(["docker", "kill", victim], check=True, stdout=subprocess.DEVNULL)
for t in threads:
    t.join()
latencies.sort()
print(f"{sum(outcomes.values())} requests: {dict(outcomes)}; latency p50 {latencies[len(latencies) // 2]:.2f} s, "
      f"max {latencies[-1]:.2f} s", file=sys.stderr)
sys.exit(0 if outcomes["ok"] > 0 and set(outcomes) == {"ok"} else 1)
EOF
for photo in coffee chelsea; do predict "$photo"; done

if [[ "${COMPOSE_TLS:-0}" == 1 ]]; then
    # Every replica must have served mutual TLS, not fallen back to plain text.
    servers="$(compose logs --no-color model-server | grep -c 'gRPC server listening' || true)"
    with_tls="$(compose logs --no-color model-server | grep 'gRPC server listening' | grep -c 'tls=true mutual_tls=true' || true)"
    [[ "$servers" -ge 3 && "$with_tls" == "$servers" ]] || die "$with_tls of $servers model servers served mutual TLS"
    say "all $servers model servers served mutual TLS"
fi

failed=false
say "passed"
