#!/usr/bin/env bash
# On the GPU box, from the repository root: install the wheels scripts/gpu_wheels.sh fetched
# (no index, no dependency resolution: the box's own torch, transformers and accelerate stay),
# then check that the quantization code imports. Then run a benchmark, e.g.
#   python benchmarks/bench_quantization_gpu.py --samples 64 --variants requant --out gpu-64.json
#
#   scripts/gpu_setup.sh [WHEELS=.carry/wheels]
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${1:-.carry/wheels}"
# requant's own wheel (FLOW=1 scripts/gpu_wheels.sh) says python 3.11, the version its CPU
# environments are tested on; the quantization and flow code run on the box's 3.12 as well
python -m pip install --quiet --no-index --no-deps --ignore-requires-python "$wheels"/*.whl
python - <<'PY'
import torch, transformers, llmcompressor, compressed_tensors
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}), "
      f"transformers {transformers.__version__}, llmcompressor {llmcompressor.__version__}, "
      f"compressed-tensors {compressed_tensors.__version__}")
import requant.quantization.single_pass  # noqa: F401  the code the benchmarks time
PY
if ls "$wheels"/requant-*.whl >/dev/null 2>&1; then  # FLOW=1: the flow imports too
    (cd /tmp && python -c "import prefect, requant.flows.requantize; print('prefect', prefect.__version__)")
fi
