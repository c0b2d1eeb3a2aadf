# The README's commands. Each target sets itself up from nothing: a fresh clone needs only python3.
#   make test    the test suite (pytest), CPU only
#   make demo    a short demonstration of the losses
#   make bench   the CPU benchmark, results into benchmarks/results/

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install test demo bench clean

install: $(STAMP)

# torch first, from the pinned CPU build, so that no dependency pulls a CUDA build; then the project
# without build isolation, so that its build sees this torch instead of fetching another.
$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) setuptools wheel torch
	$(PIP) --no-build-isolation -e '.[test,bench,train]'
	touch $@

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test: $(STAMP)
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(BIN)/python -m benchmarks.demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --device cpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
