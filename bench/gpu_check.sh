#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a GPU node without network, on that node's own torch.
#
#   bench/gpu_check.sh --wheels DIR [gpu_check.py options]   # on the GPU node
#   bench/gpu_check.sh --no-venv --cpu [options]              # here, with the current python (tests)
#
# It makes a virtual environment over the node's python3 (--system-site-packages, plus a .pth file
# naming that python's own site-packages: on a node whose python3 is itself a venv, such as
# /opt/torch/.venv, --system-site-packages alone would reach the base interpreter's packages, not
# the torch beside it; the node's pip does the installing), installs into it from DIR alone (pip --no-index --find-links DIR) the pins
# DIR/requirements.txt names, each dependency taken from the node when it satisfies the pin and
# from DIR otherwise, then runs the driver. bench/gpu_check_wheels.sh prepares DIR.
#
# Options: --wheels DIR; --venv DIR (default $TMPDIR/modelmake-gpu-check); --python PY (default
# python3); --no-venv (no environment, no install: run the driver with PY). The rest goes to
# bench/gpu_check.py (--cpu, --only CHECK..., --report DIR, --work DIR, --budget-s S).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wheels="" venv="${TMPDIR:-/tmp}/modelmake-gpu-check" py=python3 make_venv=1
die() { echo "gpu_check.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
        --venv) venv=${2:?--venv needs a folder}; shift 2 ;;
        --python) py=${2:?--python needs an interpreter}; shift 2 ;;
        --no-venv) make_venv=0; shift ;;
        -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) break ;;
    esac
done

if (( make_venv )); then
    [[ -n $wheels ]] || die "give --wheels DIR (made by bench/gpu_check_wheels.sh), or --no-venv to use $py as it is"
    [[ -f $wheels/requirements.txt ]] || die "$wheels/requirements.txt is missing: make the folder with bench/gpu_check_wheels.sh"
    t0=$SECONDS
    rm -rf "$venv"
    # --without-pip: the node's own pip (reached through the .pth file) installs into the venv; a
    # venv's bundled pip and setuptools would shadow the node's (torch asks for a newer setuptools)
    "$py" -m venv --system-site-packages --without-pip "$venv"
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$py" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/_machine_site.pth"
    "$venv/bin/python" -m pip install -q --no-index --find-links "$wheels" --no-cache-dir --no-compile \
        --disable-pip-version-check -r "$wheels/requirements.txt" \
        || die "installing from $wheels failed: a requirement above is not on this node and not in $wheels; add its wheel (bench/gpu_check_wheels.sh)"
    echo "gpu_check.sh: environment $venv ready in $((SECONDS - t0)) s (torch from $("$venv/bin/python" -c 'import torch; print(torch.__file__)'))"
    py="$venv/bin/python"
fi
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" "$repo/bench/gpu_check.py" "$@"
