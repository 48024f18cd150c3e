# Two entry points: `make demo` runs the default workflow, `make test` runs the test-suite.
# Both create .venv (Python 3.11) and install jdnas into it when missing or outdated.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv demo test dryrun repro clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/snakemake --cores all --profile workflow/profiles/local

test: $(STAMP)    # two workers; the tests sharing the smoke DAG run on one (tests/conftest.py)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

repro: $(STAMP)    # the same DAG under DVC (dvc.yaml), with the venv's jdnas on PATH
	$(BIN)/dvc repro

dryrun: $(STAMP)
	$(BIN)/snakemake -n --profile workflow/profiles/local

clean:
	rm -rf runs data/prepared reports logs .snakemake
