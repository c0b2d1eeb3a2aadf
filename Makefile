# The README's commands. Each target sets itself up from nothing: a fresh clone needs only python3.
#   make test    the test suite (pytest), CPU only
#   make demo    the main job: distil the default student on Django's catalogs (about 3 minutes)
#   make bench   the CPU benchmark, results into benchmarks/results/

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

NATIVE := $(VENV)/.native-built
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: install native test demo bench clean

install: $(STAMP)

# torch first, from the pinned CPU build, so that no dependency pulls a CUDA build; then the project
# without build isolation, so that its build sees this torch instead of fetching another (which is
# why setuptools and ninja, its build requirements, come first too). The extension is built by the
# next rule, once (MMKD_BUILD_NATIVE=0 here).
$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) setuptools wheel ninja torch
	MMKD_BUILD_NATIVE=0 $(PIP) --no-build-isolation -e '.[test,bench,train]'
	touch $@

# The compiled extension mmkd_kernels._C (the native backend), rebuilt when csrc/ changes.
native: $(NATIVE)
$(NATIVE): $(STAMP) $(CSRC) setup.py mmkd_kernels/native_build.py
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test: $(NATIVE)
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: $(NATIVE)
	HF_HUB_OFFLINE=1 $(BIN)/mmkd-train

bench: $(NATIVE)
	$(BIN)/python -m benchmarks.run --device cpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache mmkd_kernels/_C*.so
