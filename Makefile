# The two commands of the README. Both create .venv when missing and install fedmoco into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedmoco-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

# pytest exits 5 when it collects no test; that is a broken suite here, so say so and fail.
test: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# Benchmarks need the bench extra (lightly, for the side-by-side rows); torch stays as installed.
BENCH_STAMP := $(VENV)/.fedmoco-bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --disable-pip-version-check -q -e '.[bench]'
	touch $(BENCH_STAMP)

# Every benchmark in its quick configuration (< 10 min on 2 cores); rewrites docs/benchmarks.md.
# Full suite on a GPU box: $(PY) benchmarks/run_all.py --device cuda --jobs 8
bench: $(BENCH_STAMP)
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf runs demo-output .pytest_cache
