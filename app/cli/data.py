"""Commands that load interactions: CSV, Online Retail, Spark, the demo."""
from __future__ import annotations

import os

import click

from app.cli.base import fail, main
from app.config import load_config
from app.db import get_driver


DEMO_DATA = "data/online_retail/online_retail.csv.gz"


def _load_report(totals) -> None:
    """Print a loader's counts: accepted, duplicates, rejected and each drop reason."""
    for key in ("rows", "accepted", "duplicates", "rejected"):
        click.echo(f"{key:>22}: {totals.get(key, 0):,}")
    for key in sorted(set(totals) - {"rows", "accepted", "duplicates", "rejected"}):
        click.echo(f"{'dropped ' + key:>22}: {totals[key]:,}")


def _run_load(batches, label: str, to: str = "neo4j") -> None:
    from app.ingest import decay, loaders
    cfg = load_config()
    try:
        decay.check_config(cfg)
        totals = loaders.load(get_driver(cfg), cfg, batches, label=label, to=to)
    except (decay.DecayRangeError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    _load_report(totals)


@main.group()
def load():
    """Bulk-load interactions (same validation, cleaning and idempotency as POST /v1/events)."""


def _target(command):
    """The --to option: write into Neo4j, or produce into the Kafka event log for `consume` to fold."""
    return click.option("--to", "to", type=click.Choice(["neo4j", "kafka"]), default="neo4j", show_default=True,
                        help="kafka: append the events to the event log (backfills and live traffic then "
                             "share one writer and one order per user).")(command)


@load.command("online-retail")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--chunk-size", default=5000, show_default=True, help="Rows per batch / transaction.")
@_target
def load_online_retail(path: str, chunk_size: int, to: str):
    """Load the UCI Online Retail CSV: invoices -> purchases, cancellations -> returns."""
    from app.ingest import loaders
    _run_load(loaders.online_retail_batches(path, chunk_size), "online-retail", to)


@load.command("csv")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--user-col", required=True)
@click.option("--item-col", required=True)
@click.option("--ts-col", required=True, help="RFC 3339 text or epoch numbers (see --ts-unit).")
@click.option("--type-col", default=None, help="Event type column; else every row is --type.")
@click.option("--type", "default_type", default="view", show_default=True)
@click.option("--weight-col", default=None, help="Explicit weight (overrides the type's base weight).")
@click.option("--event-id-col", default=None, help="Else the id is a hash of the row's content.")
@click.option("--ts-unit", type=click.Choice(["ms", "s"]), default="ms", show_default=True)
@click.option("--chunk-size", default=5000, show_default=True)
@_target
def load_csv(path, user_col, item_col, ts_col, type_col, default_type, weight_col, event_id_col, ts_unit,
             chunk_size, to):
    """Load any interaction CSV; re-running it adds nothing."""
    from app.ingest import loaders
    _run_load(loaders.csv_batches(path, user_col, item_col, ts_col, type_col, weight_col, event_id_col,
                                  default_type, ts_unit, chunk_size), "csv", to)


@load.command("spark")
@click.option("--input", "path", required=True, help="A file or directory Spark can read.")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), default="csv", show_default=True)
@click.option("--source", type=click.Choice(["csv", "online-retail"]), default="csv", show_default=True,
              help="Column rules: the csv loader's flags, or the Online Retail layout.")
@click.option("--user-col")
@click.option("--item-col")
@click.option("--ts-col", help="RFC 3339 text or epoch numbers (see --ts-unit).")
@click.option("--type-col", default=None)
@click.option("--type", "default_type", default="view", show_default=True)
@click.option("--weight-col", default=None)
@click.option("--event-id-col", default=None)
@click.option("--ts-unit", type=click.Choice(["ms", "s"]), default="ms", show_default=True)
@click.option("--master", default="local[2]", show_default=True, help="local[N] or spark://host:port")
@click.option("--chunk-size", default=5000, show_default=True, help="Rows per batch (as the Python loaders).")
@_target
def load_spark(path, fmt, source, user_col, item_col, ts_col, type_col, default_type, weight_col, event_id_col,
               ts_unit, master, chunk_size, to):
    """Backfill with Apache Spark (PySpark): same rules as `load csv`; re-running it adds nothing."""
    from app.ingest import decay, spark
    cfg = load_config()
    options = {}
    if source == "csv":
        if not (user_col and item_col and ts_col):
            fail("--user-col, --item-col and --ts-col are required with --source csv")
        options = dict(user_col=user_col, item_col=item_col, ts_col=ts_col, type_col=type_col,
                       weight_col=weight_col, event_id_col=event_id_col, default_type=default_type,
                       ts_unit=ts_unit, source=path)
    if not os.path.exists(path):
        fail(f"no such input: {path}")
    try:
        decay.check_config(cfg)
        totals = spark.load(cfg, path, source, fmt, options, master, chunk_size, to=to)
    except (decay.DecayRangeError, ValueError) as exc:
        fail(str(exc))
    _load_report(totals)


@load.command("demo")
def load_demo():
    """Load the shipped Online Retail copy, only into a graph without interactions."""
    from app.config import ROOT
    from app.ingest import loaders, writer
    cfg = load_config()
    if writer.interacted_edges(get_driver(cfg), cfg.neo4j_database):
        click.echo("already loaded")
        return
    _run_load(loaders.online_retail_batches(ROOT / DEMO_DATA), "demo")


# Every writer of embeddings holds the refresh lease: `train` and `embed` are jobs, like `retrain`
