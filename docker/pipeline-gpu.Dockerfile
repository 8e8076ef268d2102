# GPU worker image: the pipeline environment (llm-compressor, lm-eval, Prefect, huggingface_hub)
# with PyPI's CUDA torch, plus vLLM in a second virtual environment for the evaluation servers
# (the two cannot share one: compressed-tensors 0.19 vs 0.17). Runs requantize flow runs on the
# requant-gpu work pool. Pins: constraints/pipeline.txt, and the serving pins of
# scripts/setup_envs.sh (tests/test_docker.py keeps them equal). GPUs come from the host's
# NVIDIA container runtime.
FROM python:3.11.7-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REQUANT_PROJECT_DIR=/opt/requant \
    REQUANT_SERVING_PYTHON=/opt/venvs/serving/bin/python \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    HF_HOME=/data/hf \
    PATH=/opt/venvs/pipeline/bin:$PATH

WORKDIR /opt/requant

COPY constraints/ constraints/

# vLLM for the evaluation servers, with its CUDA torch, pinned by the GPU serving lock.
RUN python -m venv /opt/venvs/serving \
    && /opt/venvs/serving/bin/pip install --no-cache-dir -c constraints/serving-cuda.txt \
        "vllm==0.32.0" "lm-eval==0.4.13"
COPY pyproject.toml README.md ./
COPY requant/ requant/
COPY flows/ flows/
COPY tasks/ tasks/
RUN python -m venv /opt/venvs/pipeline \
    && /opt/venvs/pipeline/bin/pip install --no-cache-dir -c constraints/pipeline.txt "torch==2.13.0" \
    && /opt/venvs/pipeline/bin/pip install --no-cache-dir -c constraints/pipeline.txt .

COPY deployments/ deployments/
COPY data/ data/
COPY prefect.yaml ./

RUN useradd --create-home --uid 10001 requant && mkdir -p /data && chown requant /data
USER 10001
