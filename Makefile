# Two entry points (see README): `make quickstart` trains the tiny model, `make test` runs the tests (`make test-fast`:
# the in-process tier alone, under a minute).
# Both create .venv and install what they need on first use. torch is installed first, pinned by
# TORCH_SPEC (the CPU build here; PyPI's is the CUDA build on a Linux GPU cluster). Another CUDA build, e.g.
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu130
# `make compat` runs the compatibility set on the two other ends of the supported range (docs/versions.md); CI
# runs it after `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

# The other ends: pyenv's Pythons here (override with PYTHON312= / PYTHON313= elsewhere).
PYENVS := $(HOME)/.pyenv/versions $(PYENV_ROOT)/versions /root/.pyenv/versions
PYTHON312 ?= $(firstword $(wildcard $(addsuffix /3.12*/bin/python3.12,$(PYENVS))) $(shell command -v python3.12))
PYTHON313 ?= $(firstword $(wildcard $(addsuffix /3.13*/bin/python3.13,$(PYENVS))) $(shell command -v python3.13))
GPU_STACK := .venv-gpu-stack
NEWEST := .venv-newest
NEWEST_TORCH ?= torch==2.15.0
# These machines' pip config caps torch at the release that lies on their disk; the newest end must pass it.
UNCAPPED := PIP_CONSTRAINT=/dev/null
COMPAT_TMP := .cache/compat
# The quick start's job on the other two stacks, its first 100 steps: data, diagnostics (50), validation and a
# checkpoint (100) all run, in a third of the time (CI's budget).
COMPAT_QUICKSTART := train.steps=100

.PHONY: install install-dev quickstart test-fast test test-all compat compat-gpu-stack compat-newest clean-venv

# `install`: what training and every command need; `install-dev`: the test tools on top (pytest, import-linter, and
# lm-eval and nnsight, the interop clients the tests load our outputs into), for `make test` only.
install: $(STAMP)

install-dev: $(DEV_STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e .  # (no banner about editable installs)
	touch $@

$(DEV_STAMP): $(STAMP)
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

quickstart: $(STAMP)
	$(BIN)/pretrain train configs/tiny.yaml train.resume=auto

# Two tiers (docs/testing.md): the fast tier is every in-process test (a test there that starts a process fails); then
# the tests marked `processes` (subprocesses, ranks, training runs). `make test` runs both, the fast tier first.
# PYTEST_ARGS go to every pytest run: `make test PYTEST_ARGS="-x -k resume"`.
test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest -q --fast-tier --durations=10 $(PYTEST_ARGS)

test: test-fast
	$(BIN)/python -m pytest -q -m "processes and not slow" --durations=25 $(PYTEST_ARGS)

# Everything, the `slow` tests included (more cases of paths the default run already covers end to end).
test-all: $(DEV_STAMP)
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

compat: compat-gpu-stack compat-newest

# Python 3.12 with the GPU machines' image (.ci/gpu-image.txt: torch 2.11, transformers 5.17, sentencepiece 0.2.2,
# no deepspeed / megatron-core / datasets), completed by the GPU kit's wheels installed the kit's way
# (--no-deps --target .whl/site): the kit's CPU rehearsal, then the compatibility set and the quick start on it.
$(GPU_STACK)/.installed: .ci/gpu-image.txt
	test -n "$(PYTHON312)" || { echo "make: no python3.12 found; set PYTHON312=" >&2; exit 2; }
	rm -rf $(GPU_STACK) && $(PYTHON312) -m venv $(GPU_STACK)
	$(GPU_STACK)/bin/python -m pip install -q --upgrade pip
	$(UNCAPPED) $(GPU_STACK)/bin/python -m pip install -q -r .ci/gpu-image.txt
	touch $@

compat-gpu-stack: $(GPU_STACK)/.installed
	$(GPU_STACK)/bin/python scripts/gpu_kit.py wheels
	rm -rf $(COMPAT_TMP)/gpu-stack && mkdir -p $(COMPAT_TMP)/gpu-stack
	$(GPU_STACK)/bin/python scripts/gpu_kit.py run --cpu --out $(COMPAT_TMP)/gpu-stack/kit
	PYTHONPATH=$(CURDIR)/.whl/site:$(CURDIR) $(GPU_STACK)/bin/python -m pytest -q -m "compat and not slow" -p no:cacheprovider --durations=15
	PYTHONPATH=$(CURDIR)/.whl/site:$(CURDIR) PRETRAIN_CACHE=$(COMPAT_TMP)/gpu-stack/cache \
		$(GPU_STACK)/bin/python -m pretrain train configs/tiny.yaml run.dir=$(COMPAT_TMP)/gpu-stack/tiny $(COMPAT_QUICKSTART)

# The newest releases in range: Python 3.13, torch 2.15, and `pip install -e .` picking the newest of the rest.
$(NEWEST)/.installed: setup.cfg pyproject.toml
	test -n "$(PYTHON313)" || { echo "make: no python3.13 found; set PYTHON313=" >&2; exit 2; }
	rm -rf $(NEWEST) && $(PYTHON313) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install -q --upgrade pip
	$(UNCAPPED) $(NEWEST)/bin/python -m pip install -q "$(NEWEST_TORCH)"
	$(UNCAPPED) $(NEWEST)/bin/python -m pip install -q -e ".[dev]"
	touch $@

compat-newest: $(NEWEST)/.installed
	rm -rf $(COMPAT_TMP)/newest && mkdir -p $(COMPAT_TMP)/newest
	$(NEWEST)/bin/python -m pytest -q -m "compat and not slow" -p no:cacheprovider --durations=15
	PRETRAIN_CACHE=$(COMPAT_TMP)/newest/cache $(NEWEST)/bin/pretrain train configs/tiny.yaml \
		run.dir=$(COMPAT_TMP)/newest/tiny $(COMPAT_QUICKSTART)

clean-venv:
	rm -rf $(VENV) $(GPU_STACK) $(NEWEST)
