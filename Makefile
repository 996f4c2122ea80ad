# Two entry points: `make demo` (the whole pipeline on the embedded demo task) and `make test`.
# Both create .venv and install what they need; the install is skipped when pyproject.toml is unchanged.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# On CPU machines the torch CPU wheel on disk satisfies this pin; on GPU machines PyPI's CUDA build does.
TORCH  ?= torch==2.13.0
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[flow,test]"
	touch $@

demo: $(STAMP)
	$(BIN)/distill prepare-demo --out data/models/demo-teacher
	$(BIN)/distill run configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-runs:
	rm -rf data/runs
