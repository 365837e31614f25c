"""The `interest-graph` command line: one verb per job, all driven by the same Config."""
from __future__ import annotations

import json
import os
import sys

import click

from app import migrate as migrations
from app import neo4j_local
from app.config import load_config
from app.db import get_driver


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group()
def main():
    """Real-time GraphSAGE interest graph on Neo4j."""


@main.group()
def neo4j():
    """Run the local Neo4j server (provisioned from Maven Central)."""


@neo4j.command("start")
def neo4j_start():
    """Start Neo4j in the background and wait until Bolt answers."""
    try:
        state = neo4j_local.start(load_config())
    except neo4j_local.Neo4jError as exc:
        _fail(str(exc))
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
        applied = migrations.migrate(driver, cfg.neo4j_database, {"embed_dim": cfg.embed_dim})
    except migrations.MigrationError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. Neo4j down: one clear line
        _fail(f"cannot migrate: {type(exc).__name__}: {exc}")
    for m in applied:
        click.echo(f"applied {m.path.name}")
    click.echo(f"{len(applied)} migration(s) applied")


@main.command()
def serve():
    """Serve the REST API under gunicorn on IG_HOST:IG_PORT."""
    cfg = load_config()
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "--bind", f"{cfg.host}:{cfg.port}",
                               "--workers", str(cfg.workers), "--threads", "8",
                               "--access-logfile", "-", "app.wsgi:app"])
