# The two commands of the README. Both set up .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch and torchvision are installed as a matching pair first (a torchvision wheel
# beside another torch build fails to import); the pins live here, the package itself
# asks only for ranges (pyproject.toml).
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
TORCHATTACKS ?= torchattacks==3.5.1

.PHONY: setup system test test-fast walkthrough release bench benchmark lab clean

setup: $(STAMP) system

# Debian packages the course needs: bubblewrap, the sandbox every process that runs
# student code starts in. Installed when missing (as root, as in CI); otherwise say how.
SYSTEM_PACKAGES := bubblewrap
system:
	@if ! command -v bwrap >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
		else \
			echo "Install bubblewrap (Debian/Ubuntu: sudo apt-get install bubblewrap): grading runs student code only inside it."; \
		fi; \
	fi
	@# PostgreSQL: the autograde tests grade into a throwaway server of their own.
	@if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
		else \
			echo "Install postgresql (Debian/Ubuntu: sudo apt-get install postgresql) for the PostgreSQL gradebook test."; \
		fi; \
	fi
	@# Chromium and its driver: the browser tests (tests/browser) drive JupyterLab headless.
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else \
			echo "Install chromium and chromium-driver (Debian: sudo apt-get install chromium chromium-driver) for the browser tests."; \
		fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PAIR)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# torchattacks (a peer the tests compare with) pins requests~=2.25, which Jupyter's
	# stack outgrew; it never uses requests for the attacks, so it comes without its pins.
	$(BIN)/python -m pip install --quiet --no-deps $(TORCHATTACKS)
	touch $(STAMP)

# Two pytest workers on the two cores, each PyTorch single-threaded: two threads per
# process on shared cores spin against each other (see benchmarks/threads.py).
PYTEST_PARALLEL ?= -n 2 --dist loadgroup
TEST_ENV = PATH="$(CURDIR)/$(BIN):$$PATH" MPLBACKEND=Agg OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

test: $(STAMP) system
	$(TEST_ENV) $(BIN)/python -m pytest -q $(PYTEST_PARALLEL) --durations=15

test-fast: $(STAMP) system
	$(TEST_ENV) $(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

walkthrough: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/cs-helpers walkthrough --out build/walkthrough

release: $(STAMP)
	rm -rf build/release
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/cs-helpers release --out build/release

# Every reference against its peer and its minimum, and grade/execute per notebook
# (minutes; BENCH_ARGS=--skip-notebooks leaves that out, --quick, --device cuda): build/bench.md.
BENCH_ARGS ?=
bench: $(STAMP) system
	PATH="$(CURDIR)/$(BIN):$$PATH" MPLBACKEND=Agg OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

benchmark: bench

# JupyterLab on the course: the notebooks with the package installed in .venv, every
# nbgrader tool (the formgrader reads nbgrader_config.py here) and the course's settings
# (jupyter/instructor/: no news prompt). It prints the URL to open; LAB_ARGS=--no-browser
# where no browser should start. Students start theirs from the release (its README).
LAB_ARGS ?=
lab: $(STAMP)
	env -u MPLBACKEND PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/jupyter lab \
		--config="$(CURDIR)/jupyter/instructor/jupyter_server_config.py" --ServerApp.root_dir="$(CURDIR)" \
		$$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

clean:
	rm -rf build .pytest_cache
