# Every target sets up (or refreshes) the virtualenv it needs, so each works on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# The fast tier leaves out what needs a real Airflow stack or a browser (the full tier's markers),
# and runs on 4 workers: its tests mostly wait on HTTP and Airflow. The full tier's stacks run one
# at a time.
FAST   := -m "not stack and not browser" -n 4
FULL   := -m "stack or browser"

.PHONY: venv demo test test-all lint mutation bench bench-compare bench-triggerer bench-scale airflow simulator wheel clean
N ?= 200
LATENCY ?= 60
SLOTS ?= 1

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml dev/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e . -e dev
	@touch $@

venv: $(STAMP)

## make demo: start the simulator, run the main DAG end to end with `airflow dags test`, print the result
demo: $(STAMP)
	@VENV=$(VENV) bash scripts/demo.sh

## make test: the fast tier (unit, integration over real HTTP, dag.test() DAG runs, the receiver): minutes
test: $(STAMP)
	@bash scripts/test-deps.sh fast
	$(PY) -m pytest $(FAST) --durations=5 $(PYTEST_ARGS)

## make test-all: everything: the fast tier, then the real stack (Local, Celery), the faults, the browser
test-all: $(STAMP)
	@bash scripts/test-deps.sh all
	$(PY) -m pytest $(FAST) --durations=5 $(PYTEST_ARGS)
	$(PY) -m pytest $(FULL) --durations=5 $(PYTEST_ARGS)

## make wheel: build the provider's wheel into dist/
wheel: $(STAMP)
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .

## make mutation: mutation testing (mutmut) of the modules where a silent bug costs money or data
mutation: $(STAMP)
	@bash scripts/mutation.sh

## make airflow: full local Airflow with the UI (PostgreSQL when one answers), the simulator, the connection
airflow: $(STAMP)
	@VENV=$(VENV) bash scripts/airflow.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile
	$(PY) scripts/docs_snippets.py --check

## make bench: 120 x 20 s and 200 x 60 s at the documented limit, on the real stack, against the bound
bench: $(STAMP)
	$(PY) -m benchmarks batch --slots $(SLOTS)

## make bench-compare N=200 LATENCY=60: one batch three ways (default groups, one per group, non-deferrable)
bench-compare: $(STAMP)
	$(PY) -m benchmarks batch --n $(N) --latency $(LATENCY)

## make bench-triggerer: 1,000 waiting images on one triggerer (memory, CPU)
bench-triggerer: $(STAMP)
	$(PY) -m benchmarks triggerer

## make bench-scale: 2,000 prompts at a high rate limit, and a 10,000-prompt file, in one run each
bench-scale: $(STAMP)
	$(PY) -m benchmarks scale

## make simulator: the API simulator alone on port 8089
simulator: $(STAMP)
	$(PY) -m imagecb_provider.testing.simulator --port 8089

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache *.egg-info plugins/*.egg-info dev/*.egg-info mutants artifacts dist build
