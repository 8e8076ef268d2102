# Serving image: vLLM's own OpenAI server image plus requant's rollout tooling (router, smoke and
# load tests, the promote flow, the Kubernetes client) in a separate virtual environment. Runs
# promote flow runs on the requant-serving work pool; the local blue/green target starts vLLM
# from this image's Python. The Kubernetes target deploys the plain vllm/vllm-openai image of
# the same tag. Pins: constraints/pipeline.txt for requant's environment.
FROM vllm/vllm-openai:v0.32.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REQUANT_PROJECT_DIR=/opt/requant \
    REQUANT_SERVING_PYTHON=/usr/bin/python3 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    HF_HOME=/data/hf

WORKDIR /opt/requant
COPY constraints/ constraints/
COPY pyproject.toml README.md ./
COPY requant/ requant/
COPY flows/ flows/
COPY tasks/ tasks/
RUN python3 -m venv /opt/venvs/requant \
    && /opt/venvs/requant/bin/pip install --no-cache-dir -c constraints/pipeline.txt "torch==2.13.0" \
    && /opt/venvs/requant/bin/pip install --no-cache-dir -c constraints/pipeline.txt .
COPY deployments/ deployments/
COPY prefect.yaml ./

ENV PATH=/opt/venvs/requant/bin:$PATH
# The base image's entrypoint is `vllm serve`; a worker's flow-run container sets its own command.
ENTRYPOINT []
CMD ["prefect", "worker", "start", "--pool", "requant-serving"]
