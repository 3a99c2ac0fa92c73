# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nbpipe-installed

.PHONY: demo test bench lint clean docs-cli

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall when the package metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	cd nb && ../$(PY) pi.py

test: $(STAMP)
	$(PY) -m ruff check nbpipe tests benchmarks nb
	$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

bench: $(STAMP)
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/responsiveness.py
	$(PY) benchmarks/slurm_latency.py

docs-cli: $(STAMP)
	$(PY) -c "from nbpipe.cli import reference; open('docs/cli.md', 'w').write(reference())"

lint: $(STAMP)
	$(PY) -m ruff check nbpipe tests benchmarks nb

clean:
	rm -rf $(VENV) nb/.nbpipe .pytest_cache
