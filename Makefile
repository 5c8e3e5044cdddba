# The two commands (see README.md):
#   make run    set everything up, then run the whole system with an embedded broker (streamrecall up)
#   make test   set everything up (Python env, Prometheus), then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH_INDEX ?=

.PHONY: run test setup test-fast faults bench evaluate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned. TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build
	# from PyTorch's own index (PyPI's Linux x86_64 wheel bundles CUDA libraries, several GB).
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev,devtools]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/streamrecall up

test: setup
	bash scripts/ensure-prometheus.sh
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

bench: setup
	$(VENV)/bin/streamrecall bench all

evaluate: setup
	$(VENV)/bin/streamrecall evaluate

# The fault-injection suite at full size (CI runs it at a reduced size inside `make test`).
faults: setup
	STREAMRECALL_FAULTS_SCALE=full $(PY) -m pytest -q tests/faults

clean:
	rm -rf $(VENV) state *.egg-info
