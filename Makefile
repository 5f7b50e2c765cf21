# Developer entry points. Everything runs the real thing: a kube-apiserver + etcd built
# from source by hack/testenv/build.sh (cached in ~/.cache/rotation-operator) and the
# distribution's PostgreSQL.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

# Every target runs in the project venv, which `setup` creates (hack/setup.sh installs
# whatever of Debian's packages and the venv is missing, so `make demo` and `make test` are
# all a fresh machine needs).
VENV := .venv
PYTHON := $(VENV)/bin/python
BIN := $(VENV)/bin/
PYTEST_ARGS ?=

.PHONY: setup venv controlplane testenv-up testenv-down test lint demo bench

setup:
	hack/setup.sh

venv: setup

controlplane:
	hack/testenv/build.sh

testenv-up: setup
	$(PYTHON) hack/testenv/testenv.py up

testenv-down:
	$(PYTHON) hack/testenv/testenv.py down

# TESTENV_BIN hands the already-built binaries to the fixtures. pytest's exit code 5 (no
# tests collected) is non-zero, so an empty run fails the target like any other failure.
test: setup
	bin_dir="$$(hack/testenv/build.sh)"; \
	TESTENV_BIN="$$bin_dir" $(PYTHON) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

lint: setup
	$(BIN)ruff check src tests hack bench
	$(BIN)mypy
	$(BIN)lint-imports
	$(BIN)hadolint Dockerfile
	promtool check rules manifests/monitoring/rules.yml
	promtool test rules tests/monitoring/rules_test.yml
	$(PYTHON) hack/gen_prometheusrule.py --check

# A real rotation on a local control plane + PostgreSQL, with the operator running as its
# own least-privilege identity (see hack/demo.sh).
demo: setup
	hack/testenv/build.sh >/dev/null
	PYTHON=$(PYTHON) hack/demo.sh

# Throughput, memory and latency figures (bench/README.md). BENCH_ARGS="--rows 10000000" etc.
BENCH_ARGS ?=
bench: setup
	hack/testenv/build.sh >/dev/null
	$(PYTHON) bench/bench.py $(BENCH_ARGS)
