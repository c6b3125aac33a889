# gpu-pipeline developer commands.  `make run` and `make test` are the README quick start.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast lint format bench kafka-install kafka-start kafka-stop doctor clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## Python environment in .venv (editable install with dev tools)

system-deps:  ## compilers, race detector, kcat, JDK/Maven (apt; only what is missing)
	deploy/install-system-deps.sh

kafka-install: ## Apache Kafka jars from Maven Central into deploy/kafka/lib
	deploy/kafka/kafka.sh install

kafka-start: kafka-install  ## a single-node KRaft broker on 127.0.0.1:9092
	deploy/kafka/kafka.sh start 9092

kafka-stop:
	deploy/kafka/kafka.sh stop

run: install  ## the main job on the embedded defaults: synthetic clickstream -> embedded ClickHouse
	$(VENV)/bin/gpu-pipeline run

doctor: install
	$(VENV)/bin/gpu-pipeline doctor

test: system-deps install kafka-install  ## every test (starts its own Kafka broker)
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not kafka and not slow and not tsan"

lint: install
	$(VENV)/bin/ruff check gpu_pipeline tests benchmarks
	$(VENV)/bin/ruff format --check gpu_pipeline tests benchmarks
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format gpu_pipeline tests benchmarks
	$(VENV)/bin/ruff check --fix gpu_pipeline tests benchmarks

bench: install  ## the benchmark report (benchmarks/REPORT.md)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf gpu_pipeline_data .pytest_cache .mypy_cache .ruff_cache
