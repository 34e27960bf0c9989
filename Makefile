# ai-service: `make run` (all workers, local storage) and `make test` are the whole set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
CONF := supervisord.conf
PYTEST_WORKERS ?= 3

export STORAGE_DIR ?= $(CURDIR)/data
export WORK_DIR ?= $(CURDIR)/.work
# supervisord.conf's worker programs (the GPU split): generated, git-ignored, see README "Operations".
WORKERS_CONF := supervisor.d/workers.conf

.PHONY: install lock test lint typecheck run run-train-worker run-convert-worker run-infer-worker \
        rabbitmq bench soak clean help

help:
	@echo "make run            all workers under supervisord (foreground, local storage in ./data)"
	@echo "make test           the whole test suite (installs, starts RabbitMQ if needed)"
	@echo "make run-train-worker | run-convert-worker | run-infer-worker   one worker, foreground"
	@echo "make bench          benchmarks: prints a table, writes bench/results/<date>.json and docs/PERFORMANCE.md"
	@echo "                    (BENCH_QUICK=1 for fewer repeats)"
	@echo "make soak           fault run (kills, cuts, broker restart, hostile messages, load): docs/RELIABILITY.md"
	@echo "make lock           regenerate requirements.lock (exact pins + hashes) from setup.cfg; keeps the"
	@echo "                    pins it can, UPGRADE=1 moves everything to the newest allowed; commit the result"
	@echo "make lint | typecheck | install | clean"

install: $(STAMP) $(WORKERS_CONF) /usr/bin/chromium

# The dashboard's browser test drives Debian's chromium through Playwright (no browser download).
/usr/bin/chromium:
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Written once, when missing (a fresh clone): one worker of each kind per GPU nvidia-smi lists, else
# one of each on the CPU. To change the split, rerun `ai-service supervisor-config` (README).
$(WORKERS_CONF): | $(STAMP)
	$(BIN)/ai-service supervisor-config --output $@

# Everything comes from requirements.lock: exact versions, each file checked against its sha256
# (--require-hashes), so a machine installs only what CI ran. The lock is the whole dependency
# closure, hence --no-deps: that is also what keeps openvino-telemetry out (it phones home during
# export, FIELD-NOTES; the lock leaves it out, and an older venv's copy is removed). The project
# itself goes in last, editable, built by the locked setuptools (no build isolation, no download).
$(STAMP): setup.cfg pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	-$(BIN)/python -m pip uninstall -q -y openvino-telemetry 2>/dev/null
	touch $(STAMP)

# The lock is compiled by pip-tools, kept in a venv of its own (build/lock-tools) so that
# `make install` never needs it. Besides setup.cfg (with the dev extra) the lock carries pins that
# setup.cfg cannot: torch and torchvision at the builds that ship for this platform (any other
# build is another multi-GB download), pip itself, and the build backend pyproject.toml names.
# pip-compile takes every file of each pinned version from every index pip is configured with
# (PyPI and this machine's local ones), so its hashes hold wherever the wheel comes from.
LOCK_TOOLS := build/lock-tools
LOCK_EXTRA_IN := build/lock-extra.in
LOCK_EXTRA := torch==2.14.1 torchvision==0.29.1 pip 'setuptools>=68' wheel

lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_TOOLS) && \
	    $(LOCK_TOOLS)/bin/python -m pip install -q 'pip==26.3' 'pip-tools==7.6.2'; }
	@mkdir -p $(dir $(LOCK_EXTRA_IN))
	printf '%s\n' $(LOCK_EXTRA) > $(LOCK_EXTRA_IN)
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/bin/pip-compile --quiet --generate-hashes \
	    --extra dev --strip-extras --unsafe-package openvino-telemetry \
	    --no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade) \
	    --output-file $(LOCK) setup.cfg $(LOCK_EXTRA_IN)

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
	@echo "Starting every worker and the dashboard under supervisord (Ctrl-C stops them warmly)."
	@echo "  programs: $(WORKERS_CONF) (the GPU split: rerun $(BIN)/ai-service supervisor-config to change it)"
	@echo "  status: $(BIN)/supervisorctl -c $(CONF) status   logs: logs/   storage: $(STORAGE_DIR)"
	@echo "  try it: $(BIN)/ai-service demo"
	@sed -n 's|^command=.*ai-service dashboard --port \([0-9]*\).*|  dashboard: http://127.0.0.1:\1/ (workers, jobs, live training curves, queues)|p' $(CONF)
	@echo "  HTTP (README \"HTTP\"; /healthz /readyz /metrics /openapi.json /v1/...):"
	@awk '/^\[program:/ { name = substr($$0, 10, length($$0) - 10) } \
	     match($$0, /HTTP_PORT="[0-9]+"/) { print "    " name ": http://127.0.0.1:" substr($$0, RSTART + 11, RLENGTH - 12) }' \
	     $(WORKERS_CONF)
	$(BIN)/supervisord -n -c $(CONF)

run-train-worker: install rabbitmq
	$(BIN)/ai-service worker train

run-convert-worker: install rabbitmq
	$(BIN)/ai-service worker convert

run-infer-worker: install rabbitmq
	$(BIN)/ai-service worker infer

clean:
	rm -rf .work logs .pytest_cache .mypy_cache .ruff_cache *.egg-info
