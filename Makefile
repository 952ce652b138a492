# Two commands for a fresh machine with python3 and make:
#   make demo   set up and run the daemon (against the built-in simulated API when
#               THOUSANDEYES_TOKEN is not set)
#   make test   set up and run the whole test suite
#   make check  lint, format check and mypy --strict (CI runs it, then make test)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo run test check lint bench bench-check soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	@if [ -z "$$THOUSANDEYES_TOKEN" ]; then \
	  echo "THOUSANDEYES_TOKEN is not set: contrib/demo.yaml against the built-in simulated API"; \
	  exec $(BIN)/te-scheduler -c contrib/demo.yaml run --simulate; \
	else \
	  exec $(BIN)/te-scheduler run; \
	fi

run: demo

# PostgreSQL's server programs are installed (as root, from Debian) when missing; the tests
# start a throwaway cluster of their own and skip those tests only when none can be had.
# Chromium and its driver likewise, for the status page's browser test.
test: $(STAMP)
	@bash .ci/ensure-postgres
	@bash .ci/ensure-browser
	$(BIN)/python -m pytest -q

# The strictness lives in pyproject.toml ([tool.ruff], [tool.mypy] strict = true).
LINTED := scheduler tests bench migrations
check: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy --strict scheduler

lint: check

bench: $(STAMP)
	$(BIN)/python -m bench

# A smoke run of every scenario at tiny sizes (about 30 s): the benchmark still runs and
# reports. Kept out of `make test`: it measures the tools, not the product.
bench-check: $(STAMP)
	$(BIN)/python -m pytest -q bench/test_quick.py

soak: $(STAMP)
	$(BIN)/python -m bench --soak

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache demo-history.db*
