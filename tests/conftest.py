"""Shared fixtures: a real Neo4j test server (separate from the dev one), the app, a live HTTP server."""
from __future__ import annotations

import threading

import pytest

from support import settings

settings.apply()  # the suite's server, tokens and small vectors, before the app reads its config
SERVICE = settings.headers("IG_SERVICE_TOKEN")
PRIVACY = settings.headers("IG_PRIVACY_TOKEN")

from werkzeug.serving import make_server  # noqa: E402

from app import create_app, migrate, neo4j_local  # noqa: E402
from app.config import load_config  # noqa: E402
from app.db import get_driver  # noqa: E402
from support.graph import wipe  # noqa: E402,F401 - tests import it from here


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
