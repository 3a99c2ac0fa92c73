# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nbpipe-installed
# The JupyterLab sidebar, built with the machine's Node into nbpipe/labextension.
LABEXT := nbpipe/labextension/static/style.js
LAB_SOURCES := $(wildcard labextension/src/*.ts labextension/src/components/*.tsx labextension/style/*) \
               labextension/package.json labextension/package-lock.json labextension/tsconfig.json

.PHONY: demo test bench lint clean docs docs-cli screenshots

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(LABEXT): $(LAB_SOURCES) | $(PY)
	$(PY) -m pip install -q "jupyterlab>=4.6,<5"
	rm -rf nbpipe/labextension nbpipe/static
	cd labextension && npm ci --no-audit --no-fund --loglevel=error && \
		PATH="$(abspath $(VENV))/bin:$$PATH" npm run build:prod
	touch $(LABEXT)

# Reinstall when the package metadata or the sidebar changes.
$(STAMP): pyproject.toml $(LABEXT) | $(PY)
	$(PY) -m pip install -q -e ".[test,docs]"
	touch $(STAMP)

demo: $(STAMP)
	cd nb && ../$(PY) pi.py

# The suite on TEST_WORKERS pytest-xdist workers (0, the default: in one process, the way CI has
# passed; 2 is faster on a quiet machine but not yet shown steady in CI); tests/conftest.py says
# which tests share a worker. The 30 slowest tests close the output: where CI's time goes.
TEST_WORKERS ?= 0
test: $(STAMP) docs
	$(PY) -m ruff check nbpipe tests benchmarks nb
	cd labextension && npx tsc --noEmit && npx vitest run
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=30; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"  # the peers (Parsl)
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/responsiveness.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/store.py
	$(PY) benchmarks/peer.py
	$(PY) benchmarks/slurm_latency.py
	$(PY) benchmarks/sidebar.py

screenshots: $(STAMP)
	NBPIPE_UPDATE_SCREENSHOTS=1 $(PY) -m pytest -q tests/test_sidebar_browser.py

# The documentation site (Sphinx + MyST): every warning, broken reference included, is an error.
docs: $(STAMP)
	$(PY) -m sphinx -q -W --keep-going -n -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

docs-cli: $(STAMP)
	$(PY) -c "from nbpipe.cli import reference; open('docs/cli.md', 'w').write(reference())"

lint: $(STAMP)
	$(PY) -m ruff check nbpipe tests benchmarks nb

clean:
	rm -rf $(VENV) nb/.nbpipe .pytest_cache docs/_build nbpipe/labextension labextension/lib labextension/node_modules
