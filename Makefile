# Two set-up commands: `make demo` and `make test`. Each creates .venv with pip if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cstar-installed

.PHONY: demo test test-fast lint bench-quick clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -e ".[train,dev]"
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps "torchattacks==3.5.1"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cstar pipeline --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check cstar export calibration deploy tests benchmarks
	$(VENV)/bin/mypy cstar export calibration deploy

bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf runs .pytest_cache
