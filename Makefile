# Set-up and entry points. `make demo` and `make test` each install what they need first.
# On a CUDA machine: make demo TORCH_SPEC="torch torchvision" CONSTRAINTS= (installs your CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= -c constraints-cpu.txt
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast centralised clean-runs

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned resolve would pull a newer CUDA torch (GBs) on this path.
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check $(CONSTRAINTS) -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job: federated PaGKD on the embedded synthetic default (2 NBI + 2 WLI sites, Ray simulation).
demo: $(STAMP)
	$(PY) -m server.launch $(ARGS)

# Every test, slow ones included (what CI runs).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The centralised reference (upper bound), Hydra-configured from conf/.
centralised: $(STAMP)
	$(PY) -m benchmarks.centralised $(ARGS)

clean-runs:
	rm -rf runs outputs multirun
