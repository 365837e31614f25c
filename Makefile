# `make run` and `make test` work on a fresh machine; every step reuses what is already there.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
IG := $(VENV)/bin/interest-graph
STAMP := $(VENV)/.installed-stamp
# The test suite runs on its own Neo4j (ports 7688/7475, data under var/ of this checkout, so each
# clone's server matches its own .env password): it never wipes `make run`'s data.
TEST_ENV := NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=$(CURDIR)/var/test

.PHONY: install neo4j migrate run test bench stop evaluate clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --progress-bar off -e ".[test]"
	touch $(STAMP)

neo4j: install
	$(IG) neo4j start

migrate: neo4j
	$(IG) migrate

# Demo: load the shipped Online Retail copy (once), train a first model (once, 3 epochs),
# then the worker refreshes embeddings in the background while the API serves (Ctrl-C stops both).
# IG_AUTH=off: a local demo on 127.0.0.1 takes writes without tokens (refused on any other address).
run: migrate
	$(IG) load demo
	$(IG) train --if-missing --epochs 3
	IG_AUTH=off $(IG) worker & IG_AUTH=off $(IG) serve

test: install
	$(TEST_ENV) $(IG) neo4j start
	$(TEST_ENV) $(IG) migrate
	$(PY) -m pytest

bench: install
	$(TEST_ENV) $(IG) neo4j start
	$(TEST_ENV) $(IG) migrate
	$(TEST_ENV) $(PY) -m bench.bench_ingest
	$(TEST_ENV) $(PY) -m bench.bench_refresh
	$(TEST_ENV) $(PY) -m bench.bench_soak
	$(TEST_ENV) $(PY) -m bench.bench_serving
	$(TEST_ENV) $(PY) -m bench.bench_load

# Accuracy: Gowalla (LightGCN split, ~35 min on 2 cores) and the Online Retail time split (~3 min);
# see docs/evaluation.md.
evaluate: install
	$(IG) evaluate gowalla --data-dir ../shared/data/gowalla
	$(IG) evaluate online-retail

stop:
	-$(IG) neo4j stop
	-$(TEST_ENV) $(IG) neo4j stop

clean: stop
	rm -rf $(VENV) *.egg-info
