# covidct: `make train` runs the main job, `make test` the tests; both set up .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are installed first and pinned here; override for another CUDA/CPU build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
DATA ?= $(or $(COVIDCT_DATA),data)
ARGS ?=

.PHONY: setup train test lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

## the paper's method on fold 0 with the data under DATA (default: $COVIDCT_DATA or data/)
train: setup
	@$(PY) -m covidct.data where --root "$(DATA)"
	$(PY) -m covidct.run +experiment=ours fold=0 data.root="$(DATA)" $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
