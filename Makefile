# Two commands: `make demo` runs the main job, `make test` runs the whole suite.
# Each creates (or refreshes, when pyproject.toml changes) its own virtual environment.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,data]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python train/logreg.py --out runs/logreg --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
