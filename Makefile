# The two commands: `make bench` and `make test`. Each sets itself up from nothing.
#
#   make test    build, lint and run the whole suite
#   make bench   build, then benchmark against torch on the present device
#   make reproduce   the paper's D2Z-vs-10x sweep at small scale (ARGS=--quick: ~5 min)
#                (make bench ARGS=--full: bigger workloads, bf16, 1000 numerics steps)
#
# A fresh clone gets a .venv with torch==2.13.0 (a CPU build that installs from a
# local file here; an unpinned torch would download a multi-GB CUDA build), unless
# the venv's python can already import a torch (e.g. a CUDA build you put there).

VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
ARGS   ?=
STAMP  := $(VENV)/.d2z-installed

.PHONY: test bench lint setup clean reproduce

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*)
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	@$(PY) -c "import torch, d2z_optim; print('torch', torch.__version__, '| d2z_optim', d2z_optim.__version__, '| backends', d2z_optim.available_backends())"
	@touch $@

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_throughput.py $(ARGS)
	$(PY) benchmarks/bench_numerics.py $(if $(findstring --full,$(ARGS)),--steps 1000,)

reproduce: $(STAMP)
	$(PY) benchmarks/tpp_sweep.py $(ARGS)

clean:
	rm -rf build dist *.egg-info $(VENV)
