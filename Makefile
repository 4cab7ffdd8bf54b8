# Fresh machine: `make report` builds reports/feddf.md at the default (mini) scale; `make test` runs the tests.
# Both create the virtual environment first (.venv, Python >= 3.10, torch/torchvision pinned in pyproject.toml).
VENV   ?= .venv
PYTHON ?= python3
PAPER  ?= feddf
CORES  ?= 2
SNAKEMAKE_ARGS ?=

.PHONY: venv report test expected clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

report: venv
	$(VENV)/bin/snakemake --cores $(CORES) reports/$(PAPER).md $(SNAKEMAKE_ARGS)

test: venv
	$(VENV)/bin/pytest

# Refresh tests/expected/<this CPU kind>/ (instruction set and model) after an intended change of smoke-scale numbers
# (review the diff before committing).
expected: venv
	rm -rf build/smoke
	$(VENV)/bin/snakemake -s Snakefile -d build/smoke --cores $(CORES) all --config scale=smoke
	$(VENV)/bin/python -m common.expected update --results build/smoke/results/runs

clean:
	rm -rf results .snakemake
