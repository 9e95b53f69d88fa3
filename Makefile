# covidct: `make train` runs the main job, `make test` the tests; both set up .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are installed first and pinned here; override for another CUDA/CPU build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
DATA ?= $(or $(COVIDCT_DATA),data)
ARGS ?=

# Table I: PROTOCOL=paper|paper_val|smoke, SELECT=last|best_val_auc (chosen at report time; best_val_auc
# needs runs with a validation part, e.g. PROTOCOL=paper_val), SPLIT_SEED=N|per-seed (per-seed: folds re-drawn
# for every seed, i.e. repeated cross-validation), OUT (tables), RUNS (run folders), HYDRA_ARGS (e.g. a launcher).
# Results go under outputs/ (ignored by git); RECORD=1 writes the run records (without checkpoints), the tables
# and the bench into the tracked experiments/ instead, so a committed measurement changes only on purpose, and a
# committed sweep's runs are found (and skipped) by the same command.
RECORD ?=
RESULTS := $(if $(RECORD),experiments,outputs)
PROTOCOL ?= paper
SELECT ?= last
SPLIT_SEED ?= 0
SPLIT_SEED_ARG := $(if $(filter per-seed,$(SPLIT_SEED)),'split_seed=$${seed}',split_seed=$(SPLIT_SEED))
# another split seed is another sweep, another selection another table: each gets its own folder
SWEEP := $(PROTOCOL)$(if $(filter-out 0,$(SPLIT_SEED)),-split$(SPLIT_SEED))
OUT ?= $(RESULTS)/table1-$(SWEEP)$(if $(filter-out last,$(SELECT)),-$(SELECT))
RUNS ?= $(if $(RECORD),experiments,outputs)/table1-$(SWEEP)$(if $(RECORD),/runs)
TABLE1 = $(or $(shell $(PY) -m covidct.experiments),$(error no Table I experiments from $(PY) -m covidct.experiments))
FEDERATED = $(shell $(PY) -m covidct.experiments --block federated)
ifeq ($(PROTOCOL),smoke)
FOLDS ?= 0
SEEDS ?= 643
else
FOLDS ?= 0,1,2,3
SEEDS ?= 643,644,645
endif
HYDRA_ARGS ?=
# REFERENCE: the experiment the t-tests and DeLong's test compare every other row with
REFERENCE ?= ours
REPORT_ARGS ?=
# Leave-one-site-out (make loso): the held-out site lists swept, e.g. [A],[B] (with data.sites=[A,B,C]: [C])
HELD_OUT ?= [A],[B]
# LOSO_EXPERIMENTS: the methods it trains (default: every Table I method), e.g. ours,sepnorm,joint,single
LOSO_EXPERIMENTS ?= $(TABLE1)
LOSO_OUT ?= $(RESULTS)/loso-$(SWEEP)$(if $(filter-out last,$(SELECT)),-$(SELECT))
LOSO_RUNS ?= $(if $(RECORD),experiments,outputs)/loso-$(SWEEP)$(if $(RECORD),/runs)
# Table I's federated block (make federated): its runs in a folder of their own (a sweep is one code version),
# reported with Table I's wherever that folder exists
FEDERATED_RUNS ?= $(if $(RECORD),experiments,outputs)/federated-$(SWEEP)$(if $(RECORD),/runs)

# Benchmark: DEVICE=auto|cpu|cuda; results to $(RESULTS)/bench/bench-<device>.json and .md
DEVICE ?= auto
BENCH_ARGS ?=

.PHONY: setup train test lint format clean table1 table1-collect federated loso bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# make train: the paper protocol with a GPU, the CPU protocol (conf/protocol/cpu.yaml) without one;
# PROTOCOL=paper (or any protocol) on the command line chooses.
TRAIN_PROTOCOL = $(if $(filter command line environment,$(origin PROTOCOL)),$(PROTOCOL),$(shell $(PY) -c \
	"import torch; print('paper' if torch.cuda.is_available() else 'cpu')"))

## the paper's method on fold 0 with the data under DATA (default: $COVIDCT_DATA or data/)
train: setup
	@$(PY) -m covidct.data where --root "$(DATA)"
	@$(if $(filter cpu,$(TRAIN_PROTOCOL)),echo "no GPU here: running the CPU protocol (+protocol=cpu: 64 px, width 0.25, \
	20 epochs, about 10 minutes); its numbers are not the paper's. make train PROTOCOL=paper runs the full one.",true)
	$(PY) -m covidct.run experiment=ours fold=0 +protocol=$(TRAIN_PROTOCOL) data.root="$(DATA)" $(ARGS)

## every missing run of the Table I sweep (finished ones are skipped), fold by fold (every method's fold 0 first), then
## the tables
table1: setup
	@$(PY) -m covidct.data where --root "$(DATA)"
	$(PY) -m covidct.run -m fold=$(FOLDS) seed=$(SEEDS) experiment=$(TABLE1) +protocol=$(PROTOCOL) \
		$(SPLIT_SEED_ARG) data.root="$(DATA)" paths.log_dir="$(RUNS)" $(HYDRA_ARGS)
	$(MAKE) --no-print-directory table1-collect

## Table I's federated block (local, FedAvg, FedProx, SiloBN, FedBN: one Flower client per site, its sites on this
## machine's CPUs) on the same folds and seeds, into FEDERATED_RUNS, then Table I's tables, which show it under the
## centralised rows (DeLong against ours and SepNorm)
federated: setup
	@$(PY) -m covidct.data where --root "$(DATA)"
	$(PY) -m covidct.run -m fold=$(FOLDS) seed=$(SEEDS) experiment=$(FEDERATED) +protocol=$(PROTOCOL) \
		$(SPLIT_SEED_ARG) data.root="$(DATA)" paths.log_dir="$(FEDERATED_RUNS)" $(HYDRA_ARGS)
	$(MAKE) --no-print-directory table1-collect

## leave-one-site-out: every Table I method trained on all sites but one and tested on that one, for each of
## HELD_OUT (a Hydra sweep of site lists), then Table I's report with the LOSO table (loso.md) beside it
loso: setup
	@$(PY) -m covidct.data where --root "$(DATA)"
	$(PY) -m covidct.run -m experiment=$(LOSO_EXPERIMENTS) +protocol=$(PROTOCOL) fold=$(FOLDS) seed=$(SEEDS) \
		$(SPLIT_SEED_ARG) 'data.test_sites=$(HELD_OUT)' data.root="$(DATA)" paths.log_dir="$(LOSO_RUNS)" $(HYDRA_ARGS)
	$(PY) -m covidct.report --runs "$(LOSO_RUNS)" --out "$(LOSO_OUT)" --protocol $(PROTOCOL) --select $(SELECT) \
		--folds $(FOLDS) --seeds $(SEEDS) --reference $(REFERENCE) $(REPORT_ARGS)

## only aggregate existing run records: tables, t-tests, intervals, DeLong, ROC and reliability figures in OUT, of
## RUNS and of FEDERATED_RUNS (the Federated block), each where it exists
table1-collect: setup
	$(PY) -m covidct.report --runs-if-present "$(RUNS)" --runs-if-present "$(FEDERATED_RUNS)" \
		--out "$(OUT)" --protocol $(PROTOCOL) --select $(SELECT) \
		--folds $(FOLDS) --seeds $(SEEDS) --reference $(REFERENCE) $(REPORT_ARGS)

## training img/s of the reference-like and the fast path, and of the data pipeline (when DATA exists)
bench: setup
	$(PY) -m covidct.bench --device $(DEVICE) --json $(RESULTS)/bench/bench-$(DEVICE).json \
		$(if $(wildcard $(DATA)/covid-ct),--data-root "$(DATA)",) --dicom 200 $(BENCH_ARGS)

# the tests run on every core (pytest-xdist, one torch thread a worker: tests/conftest.py; an idle worker takes
# tests queued for a busy one, worksteal); TEST_WORKERS=0 runs them in
# this process (pdb, -x)
TEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

## the fast loop: no slow, real-data or GPU tests (under 3 minutes on 2 CPU cores)
.PHONY: test-fast
test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow and not real_data and not gpu" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
