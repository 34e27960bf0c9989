# ai-service: `make run` (all workers, local storage) and `make test` are the whole set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONF := supervisord.conf
PYTEST_WORKERS ?= 3

export STORAGE_DIR ?= $(CURDIR)/data
export WORK_DIR ?= $(CURDIR)/.work
# GPU split for supervisord.conf: one worker of each kind on GPU 0 (or the CPU).
export AI_TRAIN_GPUS ?= 1
export AI_TRAIN_FIRST_GPU ?= 0
export AI_CONVERT_GPUS ?= 1
export AI_CONVERT_FIRST_GPU ?= 0
export AI_INFER_GPUS ?= 1
export AI_INFER_FIRST_GPU ?= 0

.PHONY: install test lint typecheck run run-train-worker run-convert-worker run-infer-worker \
        rabbitmq bench soak clean help

help:
	@echo "make run            all workers under supervisord (foreground, local storage in ./data)"
	@echo "make test           the whole test suite (installs, starts RabbitMQ if needed)"
	@echo "make run-train-worker | run-convert-worker | run-infer-worker   one worker, foreground"
	@echo "make bench          benchmarks: prints a table, writes bench/results/<date>.json and docs/PERFORMANCE.md"
	@echo "                    (BENCH_QUICK=1 for fewer repeats)"
	@echo "make soak           fault run (kills, cuts, broker restart, hostile messages, load): docs/RELIABILITY.md"
	@echo "make lint | typecheck | install | clean"

install: $(STAMP)

# torch and torchvision are pinned to the builds that ship for this platform; a plain
# `torch` requirement would pull another multi-GB build. openvino-telemetry phones home
# during export, so it is removed (FIELD-NOTES).
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	-$(BIN)/python -m pip uninstall -q -y openvino-telemetry 2>/dev/null
	touch $(STAMP)

rabbitmq:
	@scripts/ensure-rabbitmq.sh

test: install rabbitmq
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

lint: install
	$(BIN)/ruff check ai_service workers tests bench soak

typecheck: install
	$(BIN)/mypy

# awscli is only the benchmark's point of comparison (aws s3 sync), so it is installed here,
# not with the service; its botocore pin follows the one boto3 already has.
bench: install rabbitmq
	test -x $(BIN)/aws || $(BIN)/python -m pip install -q 'awscli>=1.34,<2'
	$(BIN)/python -m bench.run

soak: install rabbitmq
	$(BIN)/python -m soak.run

run: install rabbitmq
	@mkdir -p logs $(STORAGE_DIR) $(WORK_DIR)
	@echo "Starting every worker under supervisord (Ctrl-C stops them warmly)."
	@echo "  status: $(BIN)/supervisorctl -c $(CONF) status   logs: logs/   storage: $(STORAGE_DIR)"
	@echo "  try it: $(BIN)/ai-service demo"
	$(BIN)/supervisord -n -c $(CONF)

run-train-worker: install rabbitmq
	$(BIN)/ai-service worker train

run-convert-worker: install rabbitmq
	$(BIN)/ai-service worker convert

run-infer-worker: install rabbitmq
	$(BIN)/ai-service worker infer

clean:
	rm -rf .work logs .pytest_cache .mypy_cache .ruff_cache *.egg-info
