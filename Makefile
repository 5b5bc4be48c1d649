# posttrain: `make demo` and `make test` work on a fresh clone with only Python 3.11 and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast ui ui-stop lint clean prefect-yaml

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv (if missing) and install posttrain with its dev and bench (trl, for the TRL parity tests) extras

demo: $(STAMP)  ## run the whole pipeline on the built-in tiny model and data
	$(VENV)/bin/posttrain run conf/demo.yaml

test: $(STAMP)  ## the whole test suite, slow end-to-end tests included (3 workers: most wait on subprocesses and servers)
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)  ## the test suite without the slow end-to-end tests
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder -m "not slow"

ui: $(STAMP)  ## start a local Prefect server and MLflow UI on 127.0.0.1
	VENV=$(VENV) bash infra/ui.sh start

ui-stop:  ## stop the servers `make ui` started
	VENV=$(VENV) bash infra/ui.sh stop

lint: $(STAMP)
	$(VENV)/bin/ruff check posttrain tasks pipelines tests

prefect-yaml: $(STAMP)  ## copy conf/demo.yaml's values into prefect.yaml's deployment parameters
	$(PY) -m pipelines.prefect_yaml

clean:  ## remove run outputs (artifacts, MLflow store), keep .venv
	rm -rf artifacts mlflow.db mlruns .posttrain
