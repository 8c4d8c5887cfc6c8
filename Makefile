# The two commands a newcomer runs: `make bench` (the main job) and `make test`.
# Each creates the virtualenv, installs the pinned dependencies and builds the extension first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INSTALLED := $(VENV)/.installed
BUILT := $(VENV)/.built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h') setup.py pyproject.toml

.PHONY: all test bench lint build clean gpu-wheels

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): requirements/test.txt | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements/test.txt
	touch $@

# --no-build-isolation: build against the torch installed above, never a second copy.
$(BUILT): $(INSTALLED) $(SOURCES)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: $(BUILT)
	$(PY) -m ruff check rmt_kernels tests bench setup.py
	$(PY) -m pytest tests -q

bench: $(BUILT)
	$(PY) -m bench

lint: $(INSTALLED)
	$(PY) -m ruff check rmt_kernels tests bench setup.py

clean:
	rm -rf build $(VENV) rmt_kernels/*.so *.egg-info

# Pure-Python test dependencies for the GPU machine, which has no package registry.
gpu-wheels: $(INSTALLED)
	$(PIP) download --quiet --no-deps --only-binary=:all: -d bench/gpu/wheels \
		pytest==9.2.0 pluggy iniconfig packaging pygments pytest-benchmark==5.3.1 py-cpuinfo expecttest==0.3.0 \
		opacus==1.6.0 opt_einsum
