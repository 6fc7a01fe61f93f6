# The two commands: `make bench` and `make test`. Each sets itself up from nothing.
#
#   make test    build, lint and run the whole suite
#   make bench   build, then benchmark against torch on the present device
#   make reproduce   the paper's D2Z-vs-10x sweep at small scale (ARGS=--quick: ~5 min)
#   make wheel-cuda  the CUDA wheel for sm_80/sm_90 against torch==2.14.1+cu130 (no GPU needed):
#                    build, install in a cached venv, check the device code and the CUDA kernels
#                    are registered, run the CPU suite against that install (wheel left in dist/)
#   make gpu-check   on a GPU machine (CUDA torch, Triton, nvcc preinstalled; no venv, no network):
#                    build for the present GPU, the cuda-marked tests, GPU and host benchmarks,
#                    compute-sanitizer; results in benchmarks/results/<gpu>/ (ARGS=--quick)
#   make compat      the Triton-facing suite (interpreter, AOT PTX) with the versions of the GPU
#                    machine: triton==3.6.0 and COMPAT_TORCH (torch==2.11.0 where installable),
#                    in a cached venv
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
FRAMEWORKS := $(VENV)/.d2z-frameworks

# make wheel-cuda: a venv outside the clone, kept between runs (torch's CUDA build is 5.5 GB)
CUDA_VENV  ?= $(HOME)/.cache/d2z_optim/venv-cu130
CUDA_PY    := $(CUDA_VENV)/bin/python
CUDA_TORCH ?= torch==2.14.1
CUDA_ARCHS ?= 8.0;9.0+PTX
CUDA_STAGE := build/wheel-cuda

# make compat: the GPU machine's Triton (and torch, where a CPU build of it can be installed)
COMPAT_VENV   ?= $(HOME)/.cache/d2z_optim/venv-compat
COMPAT_PY     := $(COMPAT_VENV)/bin/python
COMPAT_TORCH  ?= torch==2.11.0
COMPAT_TRITON ?= triton==3.6.0
GPU_PY        ?= python3

.PHONY: test bench lint setup clean reproduce wheel-cuda gpu-check compat

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*/*)
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	@$(PY) -c "import torch, d2z_optim; print('torch', torch.__version__, '| d2z_optim', d2z_optim.__version__, '| backends', d2z_optim.available_backends())"
	@touch $@

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh

# the training frameworks the integrations are tested against, pinned; never a new torch
$(FRAMEWORKS): requirements-frameworks.txt $(STAMP)
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q -r requirements-frameworks.txt -c $(VENV)/torch-pin.txt
	@touch $@

# D2Z_REQUIRE_FRAMEWORKS: a framework that failed to install fails its tests, never skips them
test: lint $(FRAMEWORKS)
	D2Z_REQUIRE_FRAMEWORKS=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_throughput.py $(ARGS)
	$(PY) benchmarks/bench_host_overhead.py
	$(PY) benchmarks/bench_rounding.py
	$(PY) benchmarks/bench_numerics.py $(if $(findstring --full,$(ARGS)),--steps 1000,)

reproduce: $(STAMP)
	$(PY) benchmarks/tpp_sweep.py $(ARGS)

wheel-cuda:
	@test -x $(CUDA_PY) || python3 -m venv $(CUDA_VENV)
	@$(CUDA_PY) -c "import torch, sys; sys.exit(not torch.version.cuda)" 2>/dev/null || $(CUDA_PY) -m pip install -q $(CUDA_TORCH)
	$(CUDA_PY) -m pip install -q pytest==9.0.3 expecttest==0.3.0 hypothesis==6.155.2 numpy matplotlib 'setuptools>=70' wheel ninja
	$(CUDA_PY) tools/check_cuda_build_errors.py
	@# build from a copy of the tracked tree: its own build folder, never the CPU build's objects
	rm -rf $(CUDA_STAGE) && mkdir -p $(CUDA_STAGE)/src dist
	git ls-files -z | xargs -0 cp --parents -t $(CUDA_STAGE)/src
	rm -f dist/d2z_optim-*.whl
	cd $(CUDA_STAGE)/src && D2Z_FORCE_CUDA=1 D2Z_CUDA_ARCH_LIST='$(CUDA_ARCHS)' MAX_JOBS=$${MAX_JOBS:-2} \
		$(CUDA_PY) -m pip wheel -q --no-build-isolation --no-deps -w $(CURDIR)/dist .
	$(CUDA_PY) -m pip install -q --no-deps --force-reinstall dist/d2z_optim-*.whl
	@# from outside the clone, so `import d2z_optim` is the installed wheel
	cd $(CUDA_STAGE) && $(CUDA_PY) $(CURDIR)/tools/check_cuda_wheel.py $(CURDIR)/dist/d2z_optim-*.whl --arch 80 --arch 90 --ptx 90
	@# the CPU suite against that install: a copy of the tests and what they read, no package source
	cp -r tests benchmarks csrc tools pyproject.toml setup.py $(CUDA_STAGE)/
	cd $(CUDA_STAGE) && $(CUDA_PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/test_packaging.py

gpu-check:
	$(GPU_PY) tools/gpu_check.py $(ARGS)

compat:
	@test -x $(COMPAT_PY) || python3 -m venv $(COMPAT_VENV)
	@$(COMPAT_PY) -c "import torch" 2>/dev/null || $(COMPAT_PY) -m pip install -q $(COMPAT_TORCH)
	@# numpy 2.3: Triton 3.6's interpreter converts 1-element arrays to ints, an error from numpy 2.4
	$(COMPAT_PY) -m pip install -q pytest==9.0.3 expecttest==0.3.0 hypothesis==6.155.2 numpy==2.3.5 'setuptools>=70' wheel ninja $(COMPAT_TRITON)
	$(COMPAT_PY) -c "import torch, triton; print('compat: torch', torch.__version__, '| triton', triton.__version__)"
	rm -rf build/compat && mkdir -p build/compat/src
	git ls-files -z | xargs -0 cp --parents -t build/compat/src
	cd build/compat/src && MAX_JOBS=$${MAX_JOBS:-2} $(COMPAT_PY) -m pip install -q --no-build-isolation --no-deps .
	cp -r tests csrc pyproject.toml setup.py build/compat/
	cd build/compat && $(COMPAT_PY) -m pytest -q -p no:cacheprovider tests/test_triton_interpret.py tests/test_triton_aot.py tests/test_layers.py tests/test_arch_gate.py

clean:
	rm -rf build dist *.egg-info $(VENV)
