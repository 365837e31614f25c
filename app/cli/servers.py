"""Commands that run the servers: Neo4j, Kafka, the schema, the API, the worker, the consumer."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading

import click

from app import migrate as migrations
from app import kafka_local, neo4j_local
from app import config as config_module
from app.cli.base import fail, main
from app.config import load_config
from app.db import get_driver

CLOSE_WAIT = 10.0  # seconds `consume` waits for the Kafka client to leave the group on its way out


@main.group()
def neo4j():
    """Run the local Neo4j server (provisioned from Maven Central)."""


@neo4j.command("start")
def neo4j_start():
    """Start Neo4j in the background and wait until Bolt answers."""
    try:
        state = neo4j_local.start(load_config())
    except neo4j_local.Neo4jError as exc:
        fail(str(exc))
    click.echo(f"Neo4j {state['version']} running (pid {state['pid']}): bolt://{state['bolt']}, "
               f"Browser {state['browser']}")


@neo4j.command("stop")
def neo4j_stop():
    """Stop the local Neo4j server."""
    click.echo("stopped" if neo4j_local.stop(load_config()) else "not running")


@neo4j.command("status")
def neo4j_status():
    """Show whether the local server runs; exit 1 if Bolt does not answer."""
    state = neo4j_local.status(load_config())
    click.echo(json.dumps(state, indent=2))
    sys.exit(0 if state["bolt_open"] else 1)


@main.group()
def kafka():
    """Run the local Kafka broker (KRaft, provisioned from Maven Central)."""


@kafka.command("start")
def kafka_start():
    """Start Kafka in the background and wait until the broker answers."""
    try:
        state = kafka_local.start(load_config())
    except kafka_local.KafkaError as exc:
        fail(str(exc))
    click.echo(f"Kafka {state['version']} running (pid {state['pid']}): {state['bootstrap']}")


@kafka.command("stop")
def kafka_stop():
    """Stop the local Kafka broker."""
    click.echo("stopped" if kafka_local.stop(load_config()) else "not running")


@kafka.command("status")
def kafka_status():
    """Show whether the local broker runs; exit 1 if its port does not answer."""
    state = kafka_local.status(load_config())
    click.echo(json.dumps(state, indent=2))
    sys.exit(0 if state["broker_open"] else 1)


@main.command()
@click.option("--info", "show_info", is_flag=True, help="List applied and pending migrations.")
def migrate(show_info: bool):
    """Apply pending schema migrations in version order."""
    cfg = load_config()
    driver = get_driver(cfg)
    try:
        if show_info:
            for row in migrations.info(driver, cfg.neo4j_database):
                click.echo(f"V{row['version']:03d}  {row['state']:8s} {row['file']}  {row['applied_at'] or ''}")
            return
        applied = migrations.migrate(driver, cfg.neo4j_database, {"embed_dim": cfg.vector_dim})
    except migrations.MigrationError as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. Neo4j down: one clear line
        fail(f"cannot migrate: {type(exc).__name__}: {exc}")
    for m in applied:
        click.echo(f"applied {m.path.name}")
    click.echo(f"{len(applied)} migration(s) applied")


@main.command()
def serve():
    """Serve the REST API under granian on IG_HOST:IG_PORT."""
    cfg = load_config()
    # Worker processes: prometheus_client sums their metrics through files in this directory.
    metrics_dir = cfg.home / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # A request's matrix products are small: one BLAS thread each, or the request threads of every
    # worker oversubscribe the cores.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")  # as runtime.limit_malloc_arenas, from the start
    # Granian: its HTTP side is Rust, so a request costs less CPU than under gunicorn's threads.
    # No access log: the app logs each request (with its X-Request-ID) at IG_LOG_LEVEL=DEBUG.
    os.execvp(sys.executable, [sys.executable, "-m", "granian", "--interface", "wsgi", "--host", cfg.host,
                               "--port", str(cfg.port), "--workers", str(cfg.workers),
                               "--blocking-threads", str(cfg.threads),
                               "--log-level", "debug" if cfg.log_level == "DEBUG" else "warning",
                               "app.wsgi:app"])


@main.command()
@click.option("--wait", "wait_s", type=float, default=0.0, help="Wait up to this many seconds for the API.")
def where(wait_s: float):
    """Print where to look: the API, its docs and page, Neo4j Browser, its user and password."""
    import time

    import requests
    cfg = load_config()
    api = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '') else cfg.host}:{cfg.port}"
    deadline = time.monotonic() + wait_s
    up = False
    while True:
        try:
            up = requests.get(f"{api}/healthz", timeout=2).ok
        except requests.RequestException:
            up = False
        if up or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    state = neo4j_local.status(cfg)
    secret = "NEO4J_PASSWORD in the environment" if os.environ.get("NEO4J_PASSWORD") else \
        f"NEO4J_PASSWORD in {config_module.ENV_FILE}"
    lines = [f"API            {api}{'' if up else '  (not answering yet)'}",
             f"API docs       {api}/docs",
             f"Page           {api}/ui",
             f"Metrics        {api}/metrics",
             f"Neo4j Browser  {state['browser']}  (connect to bolt://{state['bolt']})",
             f"Neo4j user     {cfg.neo4j_user}",
             f"Neo4j password {secret}",
             "Cypher recipes " + ("docs/cypher.md" if (config_module.ROOT / "docs" / "cypher.md").exists()
                                  else "README.md, section Serving")]
    width = max(map(len, lines))
    click.echo("\n".join(["=" * width, *lines, "=" * width]))


@main.command()
def worker():
    """Run the refresh scheduler (one active worker per database; others stand by)."""
    from app.worker import Worker
    Worker(load_config()).run_forever()


@main.command()
def consume():
    """Fold the Kafka event log into Neo4j as one member of the consumer group (start several to split
    the partitions); Ctrl-C leaves the group."""
    from app.ingest.consume import Folder
    cfg = load_config()
    folder = Folder(cfg, get_driver(cfg))
    # A signal only ends the loop between batches: an exception raised inside the Kafka client's calls
    # or callbacks could leave its close() waiting for ever. Each batch's offsets are committed before
    # the next is read, so stopping loses nothing.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        folder.run(until=stop.is_set)
    finally:
        # close() can still hang inside librdkafka (confluent-kafka-python#1667): wait for it a while,
        # then exit anyway; the group hands the partitions on after its session timeout.
        closer = threading.Thread(target=folder.close, daemon=True)
        closer.start()
        closer.join(CLOSE_WAIT)
    click.echo(json.dumps(dict(folder.totals)))
