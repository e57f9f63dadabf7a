# pyevo: set-up, the default run, tests and benchmarks. Everything lives in .venv (CPU torch,
# pinned in requirements.txt so an install never pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXT_SOURCES := $(shell find csrc kernels -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null) setup.py
export HF_HUB_OFFLINE := 1

.PHONY: setup run search test bench clean

setup: $(VENV)/.built

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The extension builds against the venv's torch (no build isolation: pip would pick another torch).
$(VENV)/.built: $(VENV)/.installed $(EXT_SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# The main job: the default DiffNAS search on the built-in digits teacher (CPU).
run search: setup
	$(PY) -m pyevo.search

test: setup
	$(PY) -m pytest -q

# pytest-benchmark per op (CPU), then the op-vs-baseline-vs-peak table (CUDA when visible).
bench: setup
	$(PY) -m pytest tests/bench --benchmark-only -q
	mkdir -p runs && $(PY) -m pyevo.bench --json runs/bench.json

clean:
	rm -rf build $(VENV) pyevo/_C*.so *.egg-info
