# The two commands of the README. Both set up .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch and torchvision are installed as a matching pair first (a torchvision wheel
# beside another torch build fails to import); the pins live here, the package itself
# asks only for ranges (pyproject.toml).
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-fast walkthrough release benchmark clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PAIR)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" MPLBACKEND=Agg $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" MPLBACKEND=Agg $(BIN)/python -m pytest -q -m "not slow"

walkthrough: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/cs-helpers walkthrough --out build/walkthrough

release: $(STAMP)
	rm -rf build/release
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/cs-helpers release --out build/release

benchmark: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" MPLBACKEND=Agg $(BIN)/python benchmarks/run.py

clean:
	rm -rf build .pytest_cache
