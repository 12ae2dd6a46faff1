# Two commands do all the set-up on a fresh Linux machine with Python 3.11:
#   make demo   -> creates .venv, installs LesionLab, runs the demo study (synthetic data)
#   make test   -> creates .venv, installs LesionLab + test tools, runs the test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test realdata lint bench clean-venv browser-deps postgres-deps

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[serve,test,bench,engines,postgres]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lesionlab demo --out demo-study

# Headless Chromium for the browser test (Debian's package). Without it the browser test is skipped, except
# under CI=true, where this target (and the test itself) fails: CI must exercise the clinician page.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || true; fi; \
	  if ! command -v chromium >/dev/null 2>&1; then \
	    if [ "$$CI" = true ]; then \
	      echo "error: CI=true but Debian's chromium could not be installed (apt-get install chromium, as root)" >&2; exit 1; \
	    else echo "warning: chromium not found (apt-get install chromium); the browser test will be skipped"; fi; fi; }

# PostgreSQL for the reader-study tests on a real server (Debian's package; the tests start and stop their own
# server in a temporary folder). Missing: those tests skip, except under CI=true, where this target fails.
postgres-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || true; fi; \
	  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	    if [ "$$CI" = true ]; then \
	      echo "error: CI=true but Debian's postgresql could not be installed (apt-get install postgresql, as root)" >&2; exit 1; \
	    else echo "warning: postgresql not found (apt-get install postgresql); the PostgreSQL tests will be skipped"; fi; fi; }

test: $(STAMP) browser-deps postgres-deps
	$(BIN)/ruff check lesionlab tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Real-data acceptance checks on ../shared/data/ham10000-200x150 (documented in the README).
realdata: $(STAMP)
	$(BIN)/python -m pytest -q -s -m realdata --run-realdata tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_infer.py
	$(BIN)/python benchmarks/bench_engines.py
	$(BIN)/python benchmarks/bench_explain.py
	$(BIN)/python benchmarks/bench_service.py --clients 50 --seconds 60 --write
	$(BIN)/python benchmarks/bench_reader_study.py --readers 30

lint: $(STAMP)
	$(BIN)/ruff check lesionlab tests benchmarks
	$(BIN)/lint-imports

clean-venv:
	rm -rf $(VENV)
