"""Shared fixtures: a real Neo4j test server (separate from the dev one), the app, a live HTTP server."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

# The suite wipes its database, so it runs on its own server (ports 7688/7475, own data dir)
# and never touches the data `make run` loaded. Set these to point it elsewhere.
os.environ.setdefault("NEO4J_URI", "bolt://127.0.0.1:7688")
os.environ.setdefault("NEO4J_HTTP_PORT", "7475")
os.environ.setdefault("IG_HOME", str(Path(__file__).resolve().parents[1] / "var" / "test"))
# Its Kafka broker, likewise beside the default 9092/9093 (`make test` starts it; tests/test_kafka.py too).
os.environ.setdefault("IG_KAFKA_BOOTSTRAP", "127.0.0.1:9094")
os.environ.setdefault("IG_KAFKA_CONTROLLER_PORT", "9095")
os.environ.setdefault("IG_NEO4J_HEAP", "1g")
os.environ.setdefault("IG_NEO4J_PAGECACHE", "1g")
os.environ.setdefault("IG_ADMIN_TOKEN", "test-admin-token")
# Auth stays on in the suite, as in production: writes carry these. Reads are opened explicitly
# (IG_OPEN_READS=on, not the default) so that tests read without a token; tests/test_security.py
# checks the default, which needs one.
os.environ.setdefault("IG_SERVICE_TOKEN", "test-service-token")
os.environ.setdefault("IG_PRIVACY_TOKEN", "test-privacy-token")
os.environ.setdefault("IG_OPEN_READS", "on")
SERVICE = {"Authorization": f"Bearer {os.environ['IG_SERVICE_TOKEN']}"}
PRIVACY = {"Authorization": f"Bearer {os.environ['IG_PRIVACY_TOKEN']}"}
# Small embeddings keep the suite fast; the code paths are those of any size.
# Answers are compared with what a test has just written: every request syncs the API's copy first.
os.environ.setdefault("IG_SERVING_MAX_AGE", "0")
os.environ.setdefault("IG_SERVING_SYNC_WAIT", "30")
os.environ.setdefault("IG_EMBED_DIM", "32")
os.environ.setdefault("IG_SHARP_DIM", "8")
# Versions keep the default settings (GF-CF's form, which the Cypher recipes compute) unless a test asks
# for the settings search (tests/test_search.py).
os.environ.setdefault("IG_SEARCH_TRIALS", "0")

from werkzeug.serving import make_server  # noqa: E402

from app import create_app, migrate, neo4j_local  # noqa: E402
from app.config import load_config  # noqa: E402
from app.db import get_driver  # noqa: E402
from bench.bench_ingest import wipe  # noqa: E402,F401 - shared with the benches


@pytest.fixture(scope="session")
def cfg():
    """The test Config, with the test server started and migrated."""
    config = load_config()
    neo4j_local.start(config)
    migrate.migrate(get_driver(config), config.neo4j_database, {"embed_dim": config.vector_dim})
    return config


@pytest.fixture(scope="session")
def driver(cfg):
    """The Neo4j driver for the test server."""
    return get_driver(cfg)


@pytest.fixture
def clean_db(cfg, driver):
    """An empty graph (schema and migration records kept)."""
    wipe(driver, cfg.neo4j_database)
    return driver


@pytest.fixture
def lease(cfg, driver):
    """A worker in this process holding the refresh lease (renewed in the background) for the test:
    every writer of embeddings needs it, as `owner=lease.owner`; `lease.tick()` runs queued jobs."""
    from app.worker import Worker
    with Worker(cfg).holding() as holder:
        yield holder


@pytest.fixture(scope="session")
def app(cfg):
    """The Flask app on the test Config."""
    return create_app(cfg)


@pytest.fixture(scope="session")
def base_url(app):
    """A real HTTP server running the app on a free local port."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def serve():
    """Start extra live servers on other configs (e.g. a small batch limit, HMAC ids, a read token)."""
    servers = []

    def start(config):
        server = make_server("127.0.0.1", 0, create_app(config), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"
    yield start
    for server in servers:
        server.shutdown()


class HeldItem:
    """A write lock on an item held by an open transaction, so ingest writing that item waits."""

    def __init__(self, driver, cfg, item: str):
        self.session = driver.session(database=cfg.neo4j_database)
        self.tx = self.session.begin_transaction()
        self.tx.run("MERGE (i:Item {id: $id}) SET i._lock = true", id=item).consume()

    def release(self) -> None:
        self.tx.rollback()
        self.session.close()
