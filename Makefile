# Two commands on a fresh clone (Python >= 3.10 and pip are all it needs):
#   make demo   - set up .venv and run the main job (m2f demo on the embedded default model)
#   make test   - set up .venv with the test extras and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_WORKERS ?= 2

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch==2.13.0 is pinned exactly in setup.py (the CPU build on disk); installing it first keeps pip
# from ever resolving a CUDA build for another package's looser requirement.
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[onnx]"

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[onnx,test]"
	$(BIN)/python -m pip install --quiet --no-deps tensorrt-stubs==10.13.0.35.1

demo: install
	$(BIN)/m2f demo --out demo_out

test: install-test
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --timeout=1800 tests

clean:
	rm -rf $(VENV) demo_out build *.egg-info
