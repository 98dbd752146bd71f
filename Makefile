# Set-up and entry points. `make demo` and `make test` each install what they need first.
# On a CUDA machine: make demo TORCH_SPEC="torch torchvision" CONSTRAINTS= (installs your CUDA build).
# torch goes first, pinned: an unpinned resolve would pull a newer CUDA torch (GBs) on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0+cpu
CONSTRAINTS ?= -c constraints-cpu.txt
# Where the CPU torch wheel lies on this kind of machine (pip reads PIP_FIND_LINKS; uv needs it passed).
FIND_LINKS ?= $(PIP_FIND_LINKS)
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_ARGS = --python $(PY) --compile-bytecode $(if $(FIND_LINKS),--find-links $(FIND_LINKS))

.PHONY: install demo test test-fast lint format centralised clean-runs

# uv (pinned in the lock) installs far faster than pip resolves (docs/results.md); the
# bytecode is compiled at install because sandboxes often set PYTHONDONTWRITEBYTECODE, and every
# ClientApp message starts a fresh Python process. pip is the fallback when uv cannot be had.
$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	if $(PY) -m pip install --quiet --disable-pip-version-check $(CONSTRAINTS) uv; then \
	  $(UV) pip install --quiet $(UV_ARGS) $(TORCH_SPEC) && \
	  $(UV) pip install --quiet $(UV_ARGS) $(CONSTRAINTS) -e ".[test]"; \
	else \
	  $(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC) && \
	  $(PY) -m pip install --quiet --disable-pip-version-check $(CONSTRAINTS) -e ".[test]"; \
	fi
	touch $(STAMP)

install: $(STAMP)

# The main job: federated PaGKD on the embedded synthetic default (2 NBI + 2 WLI sites, Ray simulation).
demo: $(STAMP)
	$(PY) -m server.launch $(ARGS)

# Every test, slow ones included (what CI runs).
# Two workers, whole files each (a file's federation fixtures stay in one process): the loopback
# and Ray tests mostly wait on process start-up, so a 2-core machine runs them side by side.
PYTEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# ruff (pyproject [tool.ruff]): lint and the formatter's check; `make format` rewrites.
LINTED = common client server benchmarks deploy tests
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

format: $(STAMP)
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The centralised reference (upper bound), Hydra-configured from conf/.
centralised: $(STAMP)
	$(PY) -m benchmarks.centralised $(ARGS)

clean-runs:
	rm -rf runs outputs multirun
