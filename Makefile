# glmfleet: `make demo` deploys to a local fleet of real systemd hosts; `make test` runs the tests.
# Both do their own set-up on a fresh Debian/Ubuntu machine as root.

PYTHON ?= .venv/bin/python
HOSTS ?= 2
UV_VERSION := 0.13.9

.PHONY: venv deps demo test fleet-up fleet-down fleet-deps

venv: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	# Bytecode now: where PYTHONDONTWRITEBYTECODE is set (CI, containers) every pyinfra run would
	# otherwise compile its imports again, 0.9 s of a 4 s no-op deploy (benchmarks/RESULTS.md).
	.venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python -e '.[test]'
	touch $@

deps: venv fleet-deps

demo: deps
	$(PYTHON) -m devfleet.demo --hosts $(HOSTS)

test: deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -v -rs

include Makefile.fleet
