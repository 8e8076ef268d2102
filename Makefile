# requant: the two commands a newcomer needs are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PY := .venvs/pipeline/bin/python
REQUANT := .venvs/pipeline/bin/requant
DEMO_MODEL := models/SmolLM2-135M-Instruct
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
PREFECT_PORT ?= 4200

.PHONY: envs pipeline-env serving-env system-deps demo-model demo-prereqs test-prereqs \
	demo test test-fast lint prefect-up \
	prefect-down prefect-apply workers promote rollout-down bench-quantization-cpu bench-serving \
	bench-eval-speed bench-publish bench-rollout bench-orchestration bench-gate

envs: pipeline-env serving-env

pipeline-env:
	scripts/setup_envs.sh pipeline

serving-env:
	scripts/setup_envs.sh serving

system-deps:
	scripts/setup_system.sh

$(DEMO_MODEL)/config.json: | pipeline-env
	$(PY) scripts/prepare_demo_model.py --out $(DEMO_MODEL)

demo-model: pipeline-env $(DEMO_MODEL)/config.json

prefect-up: pipeline-env
	PREFECT_PORT=$(PREFECT_PORT) scripts/prefect_server.sh start

prefect-down:
	scripts/prefect_server.sh stop

## Pools, concurrency limit, deployments and the promote automation (prefect.yaml), in one go.
prefect-apply: prefect-up
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api REQUANT_PROJECT_DIR=$(CURDIR) \
		scripts/prefect_apply.sh

## Process workers for both pools on this machine (Ctrl-C stops them).
workers: prefect-apply
	export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api REQUANT_PROJECT_DIR=$(CURDIR) \
		PREFECT_WORKER_QUERY_SECONDS=2; \
	.venvs/pipeline/bin/prefect worker start --pool requant-serving --type process & pid=$$!; \
	trap 'kill $$pid' EXIT INT TERM; \
	.venvs/pipeline/bin/prefect worker start --pool requant-gpu --type process

## Roll a checkpoint out to the local blue/green target: make promote CHECKPOINT=runs/<id>/checkpoint
promote: envs
	$(REQUANT) promote --config deployments/configs/demo.yaml \
		$(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(if $(REVISION),--revision $(REVISION)) \
		$(if $(ROLLBACK),--rollback) $(ARGS)

## Stop the local deployment (router + vLLM servers); its deployed-state record stays.
rollout-down: pipeline-env
	$(REQUANT) down --config deployments/configs/demo.yaml

## What the two commands need first, prepared side by side: pip, apt and the model build each
## keep about one core busy, so both environments, the system packages and the demo model
## (after the pipeline environment) take about the longest of them, not their sum.
PREPARE := $(MAKE) --no-print-directory -j4
demo-prereqs: envs demo-model prefect-up
test-prereqs: envs system-deps demo-model lint

## Command 1: set everything up and run the pipeline on the embedded default (offline demo).
demo:
	@$(PREPARE) demo-prereqs
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(REQUANT) run \
		--config deployments/configs/demo.yaml $(ARGS)
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)  (stop it with: make prefect-down)"
	@echo "Serving:    http://127.0.0.1:8000/v1 (model requant-w8a8; stop it with: make rollout-down)"

## Command 2: the whole test suite, slow end-to-end tests included (what CI runs).
## The fast tests run on both cores (pytest-xdist). Of the slow ones, those marked solo (the
## README's demo and search commands, whose evaluations keep both cores busy) run alone; the
## others, which mostly wait (on servers, workers, automations, heartbeats: the cores were 88 %
## idle during the platform tests), run three files at a time. docs/testing.md has the budget.
## Exit code 5 ("no test selected", e.g. PYTEST_ARGS naming only fast tests) is not a failure.
test:
	@$(PREPARE) test-prereqs
	$(PY) -m pytest -m "not slow" -n 2 --durations=15 $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -m "slow and solo" -v --durations=0 $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -m "slow and not solo" -n 3 --dist loadfile -v --durations=0 $(PYTEST_ARGS) \
		|| [ $$? -eq 5 ]

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

bench-gate: pipeline-env   # the gate's operating characteristics (docs/evaluation.md), seconds
	$(PY) benchmarks/bench_gate_operating_characteristics.py

bench-publish: pipeline-env demo-model
	$(PY) benchmarks/bench_publish.py

bench-rollout: envs demo-model
	$(PY) benchmarks/bench_rollout.py

bench-orchestration: envs demo-model
	$(PY) benchmarks/bench_orchestration.py --worker-poll-s 10
	$(PY) benchmarks/bench_orchestration.py --worker-poll-s 2
