# mindlink: every set-up step a fresh machine needs, and the one test command CI runs.
#   make demo   — install, then run the whole pipeline on the embedded MiniNSD default (CPU, offline)
#   make test   — install, then: export/clean check, nbdev_test, executed Jupyter Book build, pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
MATHJAX_VERSION := 3.2.2
# Progress bars draw themselves only on a terminal (`make demo` in a shell), never in CI logs or the book; see
# mindlink.utils.progress_on. MINDLINK_NO_PROGRESS=1 turns them off everywhere.
# One BLAS/OpenMP thread per process: on 2 cores, two threads per kernel next to another kernel thrash (10x slower).
export OMP_NUM_THREADS ?= 1
export PYTHONHASHSEED := 0

.PHONY: install sysdeps mathjax export test nbtest book pytest demo clean

install: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# Debian's Chromium + ChromeDriver for the browser test (needs root or sudo; skipped when present).
sysdeps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

# MathJax served by the book itself (no CDN): npm registry's mathjax package, one self-contained file.
mathjax: book/_static/mathjax/tex-svg-full.js
book/_static/mathjax/tex-svg-full.js:
	mkdir -p book/_static/mathjax /tmp/mindlink-mathjax
	cd /tmp/mindlink-mathjax && npm pack -q mathjax@$(MATHJAX_VERSION) >/dev/null && tar xzf mathjax-$(MATHJAX_VERSION).tgz package/es5/tex-svg-full.js package/LICENSE
	cp /tmp/mindlink-mathjax/package/es5/tex-svg-full.js /tmp/mindlink-mathjax/package/LICENSE book/_static/mathjax/

export: install
	$(BIN)/nbdev_export

nbtest: install
	$(BIN)/nbdev_test --n_workers 2 --timing

book: install mathjax
	$(PY) scripts/build_book.py

pytest: install sysdeps
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=15

test: install sysdeps mathjax
	$(PY) scripts/check_sync.py
	$(BIN)/nbdev_test --n_workers 2 --timing
	$(PY) scripts/build_book.py
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=15

demo: install
	$(BIN)/mindlink demo --out results/demo

clean:
	rm -rf _build book/_static/mathjax results
