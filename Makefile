# requant: the two commands a newcomer needs are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PY := .venvs/pipeline/bin/python
DEMO_MODEL := models/SmolLM2-135M-Instruct
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
PREFECT_PORT ?= 4200

.PHONY: envs pipeline-env serving-env demo-model demo test test-fast lint prefect-up prefect-down \
	bench-quantization-cpu bench-serving bench-eval-speed bench-publish

envs: pipeline-env serving-env

pipeline-env:
	scripts/setup_envs.sh pipeline

serving-env:
	scripts/setup_envs.sh serving

$(DEMO_MODEL)/config.json: | pipeline-env
	$(PY) scripts/prepare_demo_model.py --out $(DEMO_MODEL)

demo-model: pipeline-env $(DEMO_MODEL)/config.json

prefect-up: pipeline-env
	PREFECT_PORT=$(PREFECT_PORT) scripts/prefect_server.sh start

prefect-down:
	scripts/prefect_server.sh stop

## Command 1: set everything up and run the pipeline on the embedded default (offline demo).
demo: envs demo-model prefect-up
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(PY) -m flows.requantize \
		--config deployments/configs/demo.yaml $(ARGS)
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)  (stop it with: make prefect-down)"

## Command 2: the whole test suite, slow end-to-end tests included (what CI runs).
test: envs demo-model lint
	$(PY) -m pytest -v $(PYTEST_ARGS)

test-fast: pipeline-env
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: pipeline-env
	.venvs/pipeline/bin/ruff check .

# Benchmarks behind the figures in docs/ (CPU; the GPU one runs on a GPU box, see docs/quantization.md)
bench-quantization-cpu: pipeline-env demo-model
	$(PY) benchmarks/bench_quantization_cpu.py --repeat 2

bench-serving: envs demo-model   # W8A8=runs/<id>/checkpoint
	$(PY) benchmarks/bench_serving.py --w8a8 $(W8A8)

bench-eval-speed: envs demo-model
	$(PY) benchmarks/bench_eval_speed.py

bench-publish: pipeline-env demo-model
	$(PY) benchmarks/bench_publish.py
