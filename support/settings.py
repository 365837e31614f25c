"""The suite's settings, as environment defaults: the tests run under them, and so do the soaks."""
from __future__ import annotations

import os
from pathlib import Path


def apply() -> None:
    """Set every suite default the environment does not already set."""
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
    # Small embeddings keep the suite fast; the code paths are those of any size.
    # Answers are compared with what a test has just written: every request syncs the API's copy first.
    os.environ.setdefault("IG_SERVING_MAX_AGE", "0")
    os.environ.setdefault("IG_SERVING_SYNC_WAIT", "30")
    os.environ.setdefault("IG_EMBED_DIM", "32")
    os.environ.setdefault("IG_SHARP_DIM", "8")
    # Versions keep the default settings (GF-CF's form, which the Cypher recipes compute) unless a test asks
    # for the settings search (tests/test_search.py).
    os.environ.setdefault("IG_SEARCH_TRIALS", "0")


def headers(token_var: str) -> dict:
    """A bearer header with the token in the environment variable `token_var`."""
    return {"Authorization": f"Bearer {os.environ[token_var]}"}
