# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the test suite).
# Both create and fill .venv/ from the package registries first; re-running installs nothing new.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lookalike-installed
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[train,test,bench,scale]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m demo

test: $(STAMP)
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-columns=min,mean,ops --benchmark-sort=name

clean:
	rm -rf runs models .pytest_cache .benchmarks .numba_cache
