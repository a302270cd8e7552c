#!/usr/bin/env bash
# Prepare the wheels bench/gpu_check.sh installs on a GPU node that has no network.
#
#   bench/gpu_check_wheels.sh [DIR] [--python-version 3.12]     # DIR default: .whl (git-ignored)
#
# The node brings python3 with torch, triton, numpy, pandas, pyarrow, tokenizers, safetensors,
# huggingface-hub, einops, psutil, ninja, msgpack and the like (the device library's KINDS.md lists
# them). DIR gets, at the versions envs/cpu.lock.txt pins (fla: FLA below):
#   * what the check runs, named in DIR/requirements.txt: transformers, trl, deepspeed, peft,
#     accelerate, datasets, jsonschema, flash-linear-attention (+ fla-core);
#   * their dependencies the node lacks: hjson, pydantic (+ pydantic-core, annotated-types,
#     typing-inspection), dill, multiprocess, jsonschema-specifications, referencing, rpds-py;
#   * fallbacks for node packages whose version a pin may not accept: fsspec (datasets wants
#     <= its pin), typing-extensions (pydantic), regex (transformers). pip takes a fallback only when
#     the node's version does not do.
# Binary wheels are for CPython --python-version (the node's: 3.12) on manylinux x86-64. deepspeed is
# an sdist on PyPI: it is built here into a pure-Python wheel with no ops compiled (DS_BUILD_OPS=0;
# on the node DeepSpeed compiles the ones it needs, such as cpu_adam, just in time). snakemake is
# not carried: the check does not run workflows. vLLM's CUDA build (GBs) is not carried either.
# Prints the folder's size at the end (the device tool carries 64 MiB at most, working tree included).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
lock=$repo/envs/cpu.lock.txt
dir=$repo/.whl pyver=3.12
FLA=0.6.0  # flash-linear-attention and fla-core: the layout distill/hybrid.py hands chunk_rwkv6
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python-version) pyver=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) dir=$1; shift ;;
    esac
done
pip=(python3 -m pip)
[[ -n ${VIRTUAL_ENV:-} ]] && pip=(python -m pip)

# name==version as envs/cpu.lock.txt pins it (names compared as pip normalises them)
pin() {
    local want v
    want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
    v=$(awk -F'==' -v w="$want" '!/^#/ && NF == 2 { n = tolower($1); gsub(/[_.]/, "-", n); if (n == w) print $2 }' "$lock")
    [[ -n $v ]] || { echo "gpu_check_wheels.sh: $1 is not pinned in $lock" >&2; exit 2; }
    echo "$1==$v"
}

top=(transformers trl peft accelerate datasets jsonschema)
deps=(hjson pydantic pydantic-core annotated-types typing-inspection dill multiprocess
      jsonschema-specifications referencing rpds-py)
fallbacks=(fsspec typing-extensions regex)

mkdir -p "$dir"
rm -f "$dir"/*.whl "$dir/requirements.txt"
reqs=()
for n in "${top[@]}" "${deps[@]}" "${fallbacks[@]}"; do reqs+=("$(pin "$n")"); done
reqs+=("flash-linear-attention==$FLA" "fla-core==$FLA")
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "${reqs[@]}"
DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps -w "$dir" "$(pin deepspeed)"

{
    echo "# what bench/gpu_check.sh installs (pip --no-index --find-links this folder)"
    for n in "${top[@]}" deepspeed; do pin "$n"; done
    echo "flash-linear-attention==$FLA"
} > "$dir/requirements.txt"

dupes=$(ls "$dir"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z_' 'a-z-' | sort | uniq -d)
[[ -z $dupes ]] || { echo "gpu_check_wheels.sh: two versions of: $dupes" >&2; exit 2; }
ls -1s --block-size=K "$dir"/*.whl | sed 's|'"$dir"'/||'
echo "$(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir"
