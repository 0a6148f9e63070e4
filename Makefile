# The two commands a newcomer needs are `make demo` and `make test`; each brings
# up everything it depends on (virtualenv, control-plane binaries) by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CLUSTER_DIR := .cluster

.DEFAULT_GOAL := help
.PHONY: help setup lock lock-upgrade tools test lint unit crds cluster-up cluster-down demo bench clean images test-images

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# requirements.lock pins every dependency of every extra, torch included, with hashes;
# `uv pip sync` installs exactly that set (and removes anything else), then the project
# itself goes in editable without touching the pins, built with the locked setuptools (an
# isolated build would fetch whatever setuptools PyPI has that day). uv itself comes from
# its own block of the lock, hashes checked. The stamp makes a second run a no-op.
export UV_PYTHON_DOWNLOADS := never
$(VENV)/.installed: pyproject.toml requirements.lock
	@test -x $(VENV)/bin/uv || { $(PYTHON) -m venv $(VENV) \
		&& awk '/^uv==/{p=1} p&&!/^ *#/{print} p&&/# via/{exit}' requirements.lock \
			> $(VENV)/uv-requirement.txt \
		&& $(PY) -m pip install --quiet --require-hashes --no-deps -r $(VENV)/uv-requirement.txt; }
	$(VENV)/bin/uv pip sync --quiet --compile-bytecode --python $(PY) requirements.lock
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) --no-deps \
		--no-build-isolation -e .
	@touch $@

setup: $(VENV)/.installed ## Create .venv with the project and everything its tests need.

# Universal: one lock for every platform and Python the project supports (>= 3.11).
LOCK_CMD = $(VENV)/bin/uv pip compile pyproject.toml --all-extras --universal \
	--python-version 3.11 --generate-hashes --no-header --quiet -o requirements.lock
# The server image's own lock: the `server` extra alone, at the main lock's versions.
SERVER_LOCK_CMD = $(VENV)/bin/uv pip compile pyproject.toml --extra server --universal \
	--python-version 3.11 --generate-hashes --no-header --quiet -c requirements.lock \
	-o inference_image/requirements.lock

# The operator image's own lock: the `operator` extra alone, at the main lock's versions.
OPERATOR_LOCK_CMD = $(VENV)/bin/uv pip compile pyproject.toml --extra operator --universal \
	--python-version 3.11 --generate-hashes --no-header --quiet -c requirements.lock \
	-o operator/requirements.lock
# Its build backend, for an install with no build isolation (which would fetch it unpinned).
OPERATOR_BUILD_LOCK_CMD = printf 'setuptools>=77\n' | $(VENV)/bin/uv pip compile - --universal \
	--python-version 3.11 --generate-hashes --no-header --quiet -c requirements.lock \
	-o operator/build-requirements.lock

lock: ## Update requirements.lock after editing pyproject.toml; pins that still fit stay.
	@test -x $(VENV)/bin/uv || $(MAKE) setup
	$(LOCK_CMD)
	$(SERVER_LOCK_CMD)
	$(OPERATOR_LOCK_CMD)
	$(OPERATOR_BUILD_LOCK_CMD)

lock-upgrade: ## Re-resolve requirements.lock to the newest versions pyproject.toml allows (PACKAGE=name: that one only).
	@test -x $(VENV)/bin/uv || $(MAKE) setup
	$(LOCK_CMD) $(if $(PACKAGE),--upgrade-package $(PACKAGE),--upgrade)
	$(SERVER_LOCK_CMD)
	$(OPERATOR_LOCK_CMD)
	$(OPERATOR_BUILD_LOCK_CMD)

tools: ## Build the pinned control plane, kwok, helm, kubeconform, actionlint and promtool once (cached in ~/.cache).
	@# actionlint's go.mod asks for Go 1.25: said now, not after the others' ten minutes.
	@v=$$(go env GOVERSION); case "$$v" in go1.2[0-4]|go1.2[0-4].*|go1.1[0-9]*) \
	  echo "make tools: Go 1.25 or newer is needed (this is $$v)" >&2; exit 2;; esac
	@hack/build-tools.sh >/dev/null

lint: setup ## Ruff over the whole repo.
	$(VENV)/bin/ruff check .

# The images first (minutes cold, seconds warm): without docker or podman none is
# built and the image tests say they were skipped.
test: setup tools lint ## The whole suite: lint, unit, server, cluster and image tests.
	@command -v "$${CXX:-g++}" >/dev/null || command -v c++ >/dev/null || { echo "make test:" \
		"the compile tests need a C++ compiler (torch.compile on the CPU): install g++" >&2; exit 2; }
	@$(PY) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")))' \
		|| { echo "make test: the compile tests need Python's headers (torch.compile's CPU" \
		"kernels include Python.h): install python3-dev" >&2; exit 2; }
	hack/images.sh --optional
	$(PY) -m pytest

images: ## Build both images from their Dockerfiles (docker, else podman); see hack/images.sh.
	hack/images.sh

test-images: setup tools images ## Both images, run as the chart and the operator run them.
	$(PY) -m pytest -m images

unit: setup ## Only the tests that need neither the control plane nor a model.
	$(PY) -m pytest tests/unit

crds: setup ## Regenerate crds/ (and the chart's copy) from the API models.
	$(PY) -m imagegen_operator.crd --write

cluster-up: setup tools ## Start the local control plane; kubeconfig at .cluster/kubeconfig.
	$(PY) hack/localcluster.py up --dir $(CLUSTER_DIR)

cluster-down: ## Stop the local control plane; leaves no process behind.
	@$(PYTHON) hack/localcluster.py down --dir $(CLUSTER_DIR)

demo: setup tools ## The end-to-end demo on the local control plane (see README).
	$(PY) hack/demo.py

bench: setup tools ## Benchmarks; results in bench/results/.
	$(PY) bench/run_all.py

clean: cluster-down ## Remove the virtualenv and local cluster state (not the binary cache).
	rm -rf $(VENV) $(CLUSTER_DIR)
