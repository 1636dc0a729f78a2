#!/usr/bin/env bash
# Starts the Python baseline in the foreground on 127.0.0.1:PORT; Ctrl-C or SIGTERM stops it.
#   ./run.sh [PORT]        env: MODEL_PATH (the .onnx file; see app.py for the default),
#                          VENV (default $TMPDIR/baseline-monolith-venv, created on first use),
#                          WORKERS (default: one per core), ORT_INTRA_OP_THREADS (default 1)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
port="${1:-8501}"
venv="${VENV:-${TMPDIR:-/tmp}/baseline-monolith-venv}"
if [ ! -x "$venv/bin/gunicorn" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
fi
export ORT_INTRA_OP_THREADS="${ORT_INTRA_OP_THREADS:-1}"
exec "$venv/bin/gunicorn" -w "${WORKERS:-$(nproc)}" -k sync -b "127.0.0.1:$port" --chdir "$here" --timeout 60 app:app
