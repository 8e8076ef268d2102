#!/usr/bin/env bash
# The wheels a GPU box needs for requant's quantization benchmarks, beyond what a CUDA PyTorch
# image has (torch, transformers, accelerate): llm-compressor and its parts, pinned exactly as
# constraints/pipeline.txt pins them, for the box's Python. Run where PyPI is reachable; copy
# the folder to the GPU box (or let the device tool carry it), then scripts/gpu_setup.sh there.
#
#   scripts/gpu_wheels.sh [OUT=.carry/wheels]      PYTHON_VERSION=3.12 by default
#   FLOW=1 scripts/gpu_wheels.sh                   also what `requant run` needs on the box
#                                                  (Prefect and its dependencies, pinned by the
#                                                  same constraints, and requant's own wheel:
#                                                  ~40 MiB more; benchmarks/bench_flow_gpu.py)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.carry/wheels}"
pyv="${PYTHON_VERSION:-3.12}"
packages=(llmcompressor compressed-tensors datasets dill multiprocess loguru pydantic
          pydantic_core annotated-types typing-inspection auto-round)
pins=()
for name in "${packages[@]}"; do
    pin=$(grep -iE "^${name//[-_]/[-_]}==" constraints/pipeline.txt) \
        || { echo "gpu_wheels: ${name} is not pinned in constraints/pipeline.txt" >&2; exit 2; }
    pins+=("$pin")
done
mkdir -p "$out"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyv" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$out" "${pins[@]}"
if [ "${FLOW:-0}" = 1 ]; then
    python3 -m pip download --quiet --only-binary=:all: --python-version "$pyv" \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_28_x86_64 --platform any \
        -c constraints/pipeline.txt -d "$out" "$(grep -E '^prefect==' constraints/pipeline.txt)"
    python3 -m pip wheel --quiet --no-deps -w "$out" .   # requant itself (pure Python)
fi
ls "$out"
