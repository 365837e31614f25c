# `make run` and `make test` work on a fresh machine; every step reuses what is already there.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
IG := $(VENV)/bin/interest-graph
STAMP := $(VENV)/.installed-stamp
# The test suite runs on its own Neo4j (ports 7688/7475, data under var/ of this checkout, so each
# clone's server matches its own .env password): it never wipes `make run`'s data.
# Its Kafka broker likewise listens on 9094 (controller 9095), beside `make run`'s 9092/9093.
TEST_ENV := NEO4J_URI=bolt://127.0.0.1:7688 NEO4J_HTTP_PORT=7475 IG_HOME=$(CURDIR)/var/test \
	IG_KAFKA_BOOTSTRAP=$${IG_KAFKA_BOOTSTRAP:-127.0.0.1:9094} IG_KAFKA_CONTROLLER_PORT=$${IG_KAFKA_CONTROLLER_PORT:-9095}

.PHONY: install neo4j migrate run test bench bench-scale stop evaluate clean browser

UI_STAMP := app/ui/node_modules/.package-lock.json

install: $(STAMP) $(UI_STAMP)

# The /ui page's graph-drawing library (Cytoscape.js), from the npm registry at build time; the app
# serves it from app/ui/node_modules, so the page needs no network at run time.
$(UI_STAMP): app/ui/package.json app/ui/package-lock.json
	@command -v npm >/dev/null || { echo "error: npm not found (Node.js is needed once, to install the page's graph library)"; exit 1; }
	npm ci --prefix app/ui --no-audit --no-fund --loglevel=error

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

# Demo: load the shipped Online Retail copy (once), train a first model (once; its settings search
# bounded to 3 minutes, so that the whole training with the re-embedding stays near 5),
# then the worker refreshes embeddings in the background while the API serves (Ctrl-C stops both);
# `where` prints the addresses once the API answers. IG_AUTH=off: a local demo on 127.0.0.1 takes
# writes without tokens (refused on any other address).
run: migrate
	$(IG) load demo
	IG_TRAIN_MINUTES=$${IG_TRAIN_MINUTES:-3} $(IG) train --if-missing
	IG_AUTH=off $(IG) worker & IG_AUTH=off $(IG) serve & $(IG) where --wait 120; wait

# The browser tests drive Debian's chromium (Playwright's own download cannot be used); install it
# when missing and possible, else those tests skip and say why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "note: chromium missing and not installable here: the browser tests will be skipped"; }

test: install browser
	$(TEST_ENV) $(IG) neo4j start
	$(TEST_ENV) $(IG) kafka start
	$(TEST_ENV) $(IG) migrate
	$(PY) -m pytest

# The serving benchmark's load generator (open loop, Go), built once into the virtualenv.
VEGETA := $(VENV)/bin/vegeta
$(VEGETA):
	@command -v go >/dev/null || { echo "error: go not found (needed once, to build the vegeta load generator)"; exit 1; }
	GOBIN=$(abspath $(VENV))/bin go install github.com/tsenart/vegeta/v12@v12.12.0

bench: install $(VEGETA)
	$(TEST_ENV) $(IG) neo4j start
	$(TEST_ENV) $(IG) kafka start
	$(TEST_ENV) $(IG) migrate
	$(TEST_ENV) $(PY) -m bench.bench_ingest
	$(TEST_ENV) $(PY) -m bench.bench_kafka
	$(TEST_ENV) $(PY) -m bench.bench_refresh
	$(TEST_ENV) $(PY) -m bench.bench_freshness
	$(TEST_ENV) $(PY) -m bench.bench_soak
	$(TEST_ENV) $(PY) -m bench.bench_serving
	$(TEST_ENV) $(PY) -m bench.bench_retention
	$(TEST_ENV) $(PY) -m bench.bench_spark
	$(TEST_ENV) $(PY) -m bench.bench_load

# The refresh on 10k / 1M / 10M-edge power-law graphs (about two hours on 2 cores; docs/scaling.md), the
# read path on them in memory and served over HTTP (about two hours more),
# and the item basis on two DistDGL partitions of Gowalla.
bench-scale: install
	$(TEST_ENV) $(IG) neo4j start
	$(TEST_ENV) IG_EMBED_DIM=64 IG_SHARP_DIM=16 $(IG) migrate
	$(TEST_ENV) IG_EMBED_DIM=64 IG_SHARP_DIM=16 $(PY) -m bench.bench_scale
	$(PY) -m bench.bench_readpath
	for n in 10000 1000000 10000000; do $(TEST_ENV) IG_EMBED_DIM=64 IG_SHARP_DIM=16 IG_NEO4J_HEAP=4g \
	  IG_NEO4J_PAGECACHE=4g $(PY) -m bench.bench_serving --scale $$n --skip-sequential --ready-seconds 1200 || exit 1; done
	$(PY) -m bench.bench_partitions

# Accuracy, each with the settings chosen on its validation split as `train` chooses them: Gowalla
# (LightGCN split), Online Retail split by time, Online Retail with each customer's latest 20% held
# out (any log: `evaluate log`), Online Retail's cold items (new ones by time, a seeded 20% hidden),
# the prequential stream replay of Online Retail, and churn and audiences at a cut of Online Retail
# (any log: `evaluate churn|audience --format csv ...`); see docs/evaluation.md.
evaluate: install
	$(IG) evaluate gowalla --data-dir ../shared/data/gowalla
	$(IG) evaluate online-retail
	$(IG) evaluate cold-items
	$(IG) evaluate log --events ../shared/data/online_retail/online_retail.csv.gz --format online-retail
	$(IG) evaluate stream --events ../shared/data/online_retail/online_retail.csv.gz --format online-retail \
		--batch-minutes 240 --retrain-every 30 --finetune-every 9 --finetune-rounds 0 --replay 3 \
		--lin-weights log1p --lin-user-weights binary --alpha 0.001 --item-bias 0.2 --bias-l2 0.1 --item-trend 3 \
		--trend-weight 0.2 --out var/eval-stream
	$(IG) evaluate churn --events ../shared/data/online_retail/online_retail.csv.gz --format online-retail --cut 2011-09-01
	$(IG) evaluate churn --events ../shared/data/online_retail/online_retail.csv.gz --format online-retail --cut 2011-08-15
	$(IG) evaluate churn --events ../shared/data/online_retail/online_retail.csv.gz --format online-retail
	$(IG) evaluate churn-study --events ../shared/data/online_retail/online_retail.csv.gz --format online-retail \
		--early 2011-04-26:2011-05-17:3 --late 2011-05-17,2011-06-03,2011-06-12
	$(IG) evaluate audience --events ../shared/data/online_retail/online_retail.csv.gz --format online-retail --cut 2011-09-01

stop:
	-$(IG) neo4j stop
	-$(IG) kafka stop
	-$(TEST_ENV) $(IG) neo4j stop
	-$(TEST_ENV) $(IG) kafka stop

clean: stop
	rm -rf $(VENV) *.egg-info
