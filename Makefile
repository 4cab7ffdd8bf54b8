# Fresh machine: `make report` builds reports/feddf.md at the default (mini) scale; `make test` runs the tests.
# Both create the virtual environment first (.venv, Python >= 3.10, torch/torchvision pinned in pyproject.toml).
VENV   ?= .venv
PYTHON ?= python3
PAPER  ?= feddf
CORES  ?= 2
SNAKEMAKE_ARGS ?=

.PHONY: venv report test benchmark clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

report: venv
	$(VENV)/bin/snakemake --cores $(CORES) reports/$(PAPER).md $(SNAKEMAKE_ARGS)

test: venv
	$(VENV)/bin/pytest

clean:
	rm -rf results .snakemake
