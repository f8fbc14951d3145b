# The two commands of README.md: `make app` and `make test`.
PY := .venv/bin/python

.PHONY: setup app test test-all bench lint

setup:
	bash scripts/setup.sh

app: setup
	$(PY) -m app --server.address 127.0.0.1 --server.headless true

test: setup
	bash scripts/setup_browser.sh
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2

test-all: setup
	bash scripts/setup_browser.sh
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 -m ""

bench: setup
	$(PY) bench/bench_methods.py

lint: setup
	$(PY) -m ruff check .
