# Two entry points (see README): `make quickstart` trains the tiny model, `make test` runs the tests.
# Both create .venv and install what they need on first use. torch is installed first, pinned by
# TORCH_SPEC (the CPU build here; PyPI's is the CUDA build on a Linux GPU cluster). Another CUDA build, e.g.
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu130
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test clean-venv

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

quickstart: $(STAMP)
	$(BIN)/pretrain train configs/tiny.yaml train.resume=auto

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
