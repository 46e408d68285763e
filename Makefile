# Two commands do all the set-up: `make demo` and `make test`.
# GPU users: make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export HF_HUB_OFFLINE ?= 1
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
# Run logs (INFO) go to the API, so the UI's Logs tab has them; the console shows Prefect's warnings only (the CLI
# prints a line per stage itself).
export PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL ?= WARNING
PREFECT_PORT ?= 4200
WORK_POOL ?= llama2-gpu

.PHONY: install install-base install-llamacpp demo test test-quick lint server worker deploy clean

# torch and the project: all `make demo` needs. `make install` adds the extras (dev tools, tracking, sweeps): about a
# minute more on 2 cores, kept out of the demo's 10 minutes.
$(VENV)/.installed-base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-base
	$(PIP) install -q -e ".[dev,tracking,sweep]"
	touch $@

# llama-cpp-python (extra `llamacpp`), for the test that runs GGUF exports in llama.cpp: `make test` installs it,
# `make demo` does not need it. PyPI has no Linux wheel, so pip compiles llama.cpp, once per machine: pip keeps the
# built wheel in its cache. LLAMA_CPP_CMAKE_ARGS keep that build to the libraries the binding loads: portable CPU
# code (no -march=native, so a cached wheel runs on any x86-64 with AVX2), no multimodal library, tools, examples,
# tests or server.
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

$(VENV)/.installed-llamacpp: $(VENV)/.installed
	@echo "installing llama-cpp-python: the first time on a machine it compiles llama.cpp (about 7 minutes on 2 cores)"
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PIP) install -q -e ".[dev,tracking,sweep,llamacpp]"
	touch $@

install-base: $(VENV)/.installed-base

install: $(VENV)/.installed

install-llamacpp: $(VENV)/.installed-llamacpp

demo: install-base
	$(PY) -m flows.cli run --preset demo-tiny

# The suite in TEST_WORKERS processes (pytest-xdist), each test file whole in one of them (--dist loadfile: a file's
# module fixtures are built once); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: install-llamacpp lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30

test-quick: install lint
	$(PY) -m pytest -q -m "not slow"

# ruff (pyproject.toml [tool.ruff]: line length 120, pycodestyle, pyflakes, bugbear)
lint: install
	$(PY) -m ruff check .

clean:
	rm -rf runs .prefect demo_out

# --- Prefect: UI server, GPU work pool + worker, deployments (see README "Deployments and the Prefect UI") ---
PREFECT := $(VENV)/bin/prefect
PREFECT_API := http://127.0.0.1:$(PREFECT_PORT)/api
GPU_SLOTS ?= 1
CUDA_VISIBLE_DEVICES ?= 0
HF_HOME ?= $(HOME)/.cache/huggingface
LLAMA2_ALIGN_ROOT ?= $(CURDIR)
LLAMA2_ALIGN_RUNS_ROOT ?= $(CURDIR)/runs
PREFECT_ENV = PREFECT_API_URL=$(PREFECT_API) PREFECT_UI_API_URL=$(PREFECT_API) \
	LLAMA2_ALIGN_ROOT=$(LLAMA2_ALIGN_ROOT) LLAMA2_ALIGN_RUNS_ROOT=$(LLAMA2_ALIGN_RUNS_ROOT) \
	HF_HOME=$(HF_HOME) CUDA_VISIBLE_DEVICES=$(CUDA_VISIBLE_DEVICES)

# The UI at http://127.0.0.1:$(PREFECT_PORT); SQLite under $(PREFECT_HOME). Migrate first (a fresh DB takes 15-20 s).
server: install
	mkdir -p $(PREFECT_HOME)
	$(PREFECT_ENV) $(PREFECT) server database upgrade -y
	$(PREFECT_ENV) $(PREFECT) server start --host 127.0.0.1 --port $(PREFECT_PORT)

# A process worker on $(WORK_POOL); creates the pool and the `gpu` tag limit ($(GPU_SLOTS) slot(s)) when missing.
ENSURE_POOL = $(PREFECT_ENV) $(PREFECT) work-pool inspect $(WORK_POOL) >/dev/null 2>&1 || \
	$(PREFECT_ENV) $(PREFECT) work-pool create $(WORK_POOL) --type process

worker: install
	$(ENSURE_POOL)
	$(PREFECT_ENV) $(PREFECT) concurrency-limit inspect gpu >/dev/null 2>&1 || \
		$(PREFECT_ENV) $(PREFECT) concurrency-limit create gpu $(GPU_SLOTS)
	$(PREFECT_ENV) $(PREFECT) worker start --pool $(WORK_POOL)

# Register every deployment in deployments/prefect.yaml (paths filled in from the variables above); needs the
# server, and creates the work pool when missing (prefect deploy --no-prompt refuses a missing pool).
deploy: install
	$(ENSURE_POOL)
	$(PREFECT_ENV) $(PREFECT) --no-prompt deploy --all --prefect-file deployments/prefect.yaml
