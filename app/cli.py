"""The `interest-graph` command line: one verb per job, all driven by the same Config."""
from __future__ import annotations

import json
import os
import shutil
import sys

import click

from app import migrate as migrations
from app import kafka_local, neo4j_local
from app import config as config_module
from app.config import load_config
from app.db import get_driver


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


class _Main(click.Group):
    """Settings that cannot be used are one line and exit code 1, whichever command reads them."""

    def invoke(self, ctx):
        from app.config import ConfigError
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            _fail(str(exc))


@click.group(cls=_Main)
def main():
    """Real-time GraphSAGE interest graph on Neo4j."""
    from app import logs
    try:
        logs.setup(load_config())
    except ValueError as exc:  # e.g. IG_LOG_LEVEL=LOUD
        _fail(str(exc))


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


@main.group()
def kafka():
    """Run the local Kafka broker (KRaft, provisioned from Maven Central)."""


@kafka.command("start")
def kafka_start():
    """Start Kafka in the background and wait until the broker answers."""
    try:
        state = kafka_local.start(load_config())
    except kafka_local.KafkaError as exc:
        _fail(str(exc))
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
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. Neo4j down: one clear line
        _fail(f"cannot migrate: {type(exc).__name__}: {exc}")
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


# --- ingest -----------------------------------------------------------------
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
        _fail(str(exc))
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
def load_spark(path, fmt, source, user_col, item_col, ts_col, type_col, default_type, weight_col, event_id_col,
               ts_unit, master, chunk_size):
    """Backfill with Apache Spark (PySpark): same rules as `load csv`; re-running it adds nothing."""
    from app.ingest import decay, spark
    cfg = load_config()
    options = {}
    if source == "csv":
        if not (user_col and item_col and ts_col):
            _fail("--user-col, --item-col and --ts-col are required with --source csv")
        options = dict(user_col=user_col, item_col=item_col, ts_col=ts_col, type_col=type_col,
                       weight_col=weight_col, event_id_col=event_id_col, default_type=default_type,
                       ts_unit=ts_unit, source=path)
    if not os.path.exists(path):
        _fail(f"no such input: {path}")
    try:
        decay.check_config(cfg)
        totals = spark.load(cfg, path, source, fmt, options, master, chunk_size)
    except (decay.DecayRangeError, ValueError) as exc:
        _fail(str(exc))
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


# --- model and refresh ------------------------------------------------------
# Every writer of embeddings holds the refresh lease: `train` and `embed` are jobs, like `retrain`
# and `reindex`, run here as the lease holder when no worker is active, else by the worker.
@main.command()
@click.option("--epochs", type=int, default=None,
              help="Rounds of the response search when the settings search is off (IG_SEARCH_TRIALS=0).")
@click.option("--if-missing", is_flag=True, help="Do nothing when a current model exists.")
def train(epochs, if_missing):
    """Train a new model version on the graph, re-embed everything with it and make it current."""
    from app.embeddings import models
    cfg = load_config()
    if if_missing and models.current_info(get_driver(cfg), cfg):
        click.echo("a current model exists; not training (run `interest-graph retrain` to replace it)")
        return
    job = _finished_job("retrain", {"reason": "cli", "epochs": epochs})
    result = job["result"]
    click.echo(json.dumps({k: v for k, v in result.items() if k != "embed"}, indent=2))
    ours, pop = result["metrics"], result.get("popularity") or {}
    if "recall@20" in ours and "recall@20" in pop:
        chosen = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in (result.get("settings") or {}).items())
        click.echo(f"chosen settings: {chosen}")
        click.echo(f"held-out (each shopper's latest items): Recall@20 {ours['recall@20']:.4f}, "
                   f"NDCG@20 {ours.get('ndcg@20', 0.0):.4f} (popularity {pop['recall@20']:.4f} / "
                   f"{pop.get('ndcg@20', 0.0):.4f}) on {ours['users']} users; TensorBoard logs: {result['runs']}")


@main.command()
@click.option("--full", is_flag=True, required=True, help="Recompute every embedding (the only mode here).")
def embed(full):
    """Recompute every embedding with the current model (the same job as `reindex --full`)."""
    from app.embeddings import models
    cfg = load_config()
    if models.current_info(get_driver(cfg), cfg) is None:
        _fail("no trained model yet: run `interest-graph train` first")
    click.echo(json.dumps(_finished_job("reindex", {"mode": "full"})["result"], indent=2))


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
    try:
        folder.run()
    except KeyboardInterrupt:
        pass
    finally:
        folder.close()
    click.echo(json.dumps(dict(folder.totals)))


def _queue_job(kind: str, params: dict) -> dict:
    from app import jobs
    cfg = load_config()
    with get_driver(cfg).session(database=cfg.neo4j_database) as s:
        job = jobs.create(s, kind, params)
    click.echo(f"queued job {job['id']} ({kind})", err=True)
    return job


def _wait_job(job: dict) -> dict:
    """Wait for a queued job to finish: run it here when no worker is active, else let the worker."""
    import time

    from app import jobs
    from app.worker import Worker
    cfg = load_config()
    driver = get_driver(cfg)
    helper = Worker(cfg, progress=True)
    while True:
        with driver.session(database=cfg.neo4j_database) as s:
            job = jobs.get(s, job["id"])
        if job["state"] in ("succeeded", "failed"):
            return job
        if job["state"] == "queued" and helper.renew_lease():
            # No worker was active: this process does the work as the lease holder, renewing the
            # lease meanwhile so that a standby worker does not take over (and run the job again).
            with helper.renewing():
                helper.tick()
            helper.release()
        else:
            time.sleep(0.5)


def _finished_job(kind: str, params: dict) -> dict:
    """Queue a job and wait for it; exit 1 with its error unless it succeeds."""
    job = _wait_job(_queue_job(kind, params))
    if job["state"] != "succeeded":
        _fail(f"job {job['id']} ({kind}) failed: {job.get('error')}")
    return job


def _run_job(kind: str, params: dict, wait: bool) -> None:
    """Queue a job; unless `wait` is off, wait for it (see `_wait_job`) and print it."""
    job = _queue_job(kind, params)
    if wait:
        job = _wait_job(job)
        click.echo(json.dumps(job, indent=2, default=str))
        sys.exit(0 if job["state"] == "succeeded" else 1)


@main.command()
@click.option("--full", is_flag=True, help="Recompute everything instead of what changed.")
@click.option("--no-wait", is_flag=True, help="Queue and return at once.")
def reindex(full, no_wait):
    """Refresh embeddings now (incremental, or --full)."""
    _run_job("reindex", {"mode": "full" if full else "incremental"}, not no_wait)


@main.command()
@click.option("--no-wait", is_flag=True, help="Queue and return at once.")
def retrain(no_wait):
    """Retrain, then re-embed everything under the new model version."""
    _run_job("retrain", {"reason": "cli"}, not no_wait)


@main.command()
@click.option("--no-wait", is_flag=True, help="Queue and return at once.")
def finetune(no_wait):
    """Streaming update: fold in new items, fine-tune the responses, publish only if not worse."""
    _run_job("finetune", {"reason": "cli"}, not no_wait)


@main.command()
def status():
    """Watermark, lag, recent runs, model version and node counts."""
    from app.status import status as pipeline_status
    cfg = load_config()
    click.echo(json.dumps(pipeline_status(get_driver(cfg), cfg), indent=2))


@main.group()
def evaluate():
    """Offline accuracy on public benchmarks."""


def event_file_options(f):
    """An event file and `load csv`'s column flags (or the Online Retail format)."""
    for option in reversed([
        click.option("--events", "path", required=True, type=click.Path(exists=True, dir_okay=False),
                     help="Interaction file (CSV, optionally gzipped)."),
        click.option("--format", "fmt", type=click.Choice(["csv", "online-retail"]), default="csv",
                     show_default=True),
        click.option("--user-col"),
        click.option("--item-col"),
        click.option("--ts-col", help="ISO 8601 text (no offset: UTC) or epoch numbers (see --ts-unit)."),
        click.option("--ts-unit", type=click.Choice(["s", "ms"]), default="s", show_default=True),
        click.option("--weight-col", default=None, help="Explicit weight, e.g. a rating."),
        click.option("--type-col", default=None, help="Event type (view, click, cart, purchase, return)."),
    ]):
        f = option(f)
    return f


def model_options(f):
    """Our model's filter, spectral weight and item-bias flags (graph_models.ModelConfig; unset: its defaults)."""
    for option in reversed([
        click.option("--lin-weights", type=click.Choice(["raw", "log1p", "binary"]), default=None,
                     help="Fix our models' filter weights: as stored, log(1 + w), or 1 per edge (default: chosen)."),
        click.option("--lin-user-weights", type=click.Choice(["raw", "log1p", "binary"]), default=None,
                     help="The same for the scored shopper's own row (default: as --lin-weights)."),
        click.option("--alpha", type=float, default=None,
                     help="Fix the weight of our models' low-pass block (default: chosen on validation)."),
        click.option("--item-bias", type=click.FloatRange(0), default=None,
                     help="Fix the temperature of our models' item biases (0: none; default: chosen on validation)."),
    ]):
        f = option(f)
    return f


def _chosen(lin_weights, lin_user_weights, alpha, item_bias) -> dict:
    """The model flags that were given, as ModelConfig fields."""
    chosen = {"lin_weights": lin_weights, "lin_user_weights": lin_user_weights, "alpha": alpha,
              "bias_temperature": item_bias}
    return {k: v for k, v in chosen.items() if v is not None}


@evaluate.command("gowalla")
@click.option("--data-dir", default="../shared/data/gowalla", show_default=True,
              type=click.Path(exists=True, file_okay=False), help="Holds train.txt.gz and test.txt.gz.")
@click.option("--epochs", type=int, default=None, help="Override the number of epochs.")
@model_options
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
def evaluate_gowalla(data_dir, epochs, lin_weights, lin_user_weights, alpha, item_bias, out):
    """Train on the LightGCN Gowalla split; Recall/NDCG@20 of ours, tuned ItemKNN, GF-CF and popularity."""
    from graph_models.gowalla import run_evaluation
    fixed = _chosen(lin_weights, lin_user_weights, alpha, item_bias)
    _evaluate(lambda mcfg, log_dir: run_evaluation(data_dir, mcfg, log_dir=log_dir, fixed=fixed), "gowalla", epochs,
              out, **fixed)


@evaluate.command("online-retail")
@click.option("--path", default="../shared/data/online_retail/online_retail.csv.gz", show_default=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--epochs", type=int, default=None, help="Override the number of epochs.")
@model_options
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
def evaluate_retail(path, epochs, lin_weights, lin_user_weights, alpha, item_bias, out):
    """Time-ordered split of UCI Online Retail (first 80% of time to train): ours against the baselines."""
    from graph_models.retail import run_evaluation
    cfg = load_config()  # the demo's sizes: what `make run` serves
    fixed = _chosen(lin_weights, lin_user_weights, alpha, item_bias)
    _evaluate(lambda mcfg, log_dir: run_evaluation(path, mcfg, log_dir=log_dir, fixed=fixed), "online-retail", epochs,
              out, dim=cfg.embed_dim, sharp_dim=cfg.sharp_dim, **fixed)


@evaluate.command("cold-items")
@click.option("--path", default="../shared/data/online_retail/online_retail.csv.gz", show_default=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--protocol", type=click.Choice(["both", "time", "heldout"]), default="both", show_default=True,
              help="time: items first sold after training; heldout: a seeded 20% of items hidden.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
def evaluate_cold_items(path, protocol, out):
    """Online Retail's new items (first sold after training) and a seeded 20% of items hidden with all their
    edges: ours (with the learned content map) against EASE, popularity by category, content-kNN and the
    model without content, all in one run; settings chosen on validation as `train` chooses them."""
    from datetime import datetime, timezone

    from app.embeddings.training import fixed_settings, model_config
    from graph_models import coldeval
    cfg = load_config()
    log_dir = cfg.home / "runs" / f"eval-cold-items-{protocol}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    click.echo(f"TensorBoard logs: {log_dir} (tensorboard --logdir {log_dir.parent})")
    protocols = ("time", "heldout") if protocol == "both" else (protocol,)
    report = coldeval.run_evaluation(path, model_config(cfg), log_dir=str(log_dir), fixed=fixed_settings(cfg),
                                     protocols=protocols)
    click.echo(json.dumps(report, indent=2, default=str))
    click.echo(coldeval.table(report))
    if out:
        with open(out, "w") as fh:
            json.dump(report, fh, indent=2, default=str)


@evaluate.command("log")
@event_file_options
@click.option("--test-fraction", type=click.FloatRange(0.05, 0.5), default=0.2, show_default=True,
              help="Each shopper's latest share of interactions held out as the test.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
def evaluate_log(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, test_fraction, out):
    """Any event log, each shopper's latest interactions held out: ours (trained as `train` does, settings
    chosen on validation) against EASE, ItemKNN (both tuned on the same validation), GF-CF and popularity."""
    from app.evaluation import events
    from app.embeddings.training import fixed_settings, model_config
    from graph_models import logeval
    from graph_models.stream import Live
    if fmt == "csv" and not (user_col and item_col and ts_col):
        _fail("--format csv needs --user-col, --item-col and --ts-col")
    cfg = load_config()
    try:
        log = events.read(cfg, events.batches(path, fmt, user_col=user_col, item_col=item_col, ts_col=ts_col,
                                              ts_unit=ts_unit, weight_col=weight_col, type_col=type_col), 1.0)
    except ValueError as exc:
        _fail(str(exc))
    edges = Live(log.stream, len(log.stream.ts)).edges()
    graph = edges.graph()
    first = logeval.first_matrix(graph, edges.u, edges.i, edges.first)
    mcfg = model_config(cfg)
    try:
        report = logeval.run(graph, first, mcfg, test_fraction, fixed_settings(cfg), cfg.train_minutes * 60)
    except ValueError as exc:
        _fail(str(exc))
    _print_report(report, ("ours", "ease", "itemknn", "gfcf", "popularity"), out)


@evaluate.command("stream")
@event_file_options
@click.option("--k", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--train-fraction", type=click.FloatRange(0.05, 0.95), default=0.8, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Events per micro-batch.")
@click.option("--batch-minutes", type=click.FloatRange(min=0.001), default=None, help="Minutes of time per micro-batch.")
@click.option("--retrain-every", type=click.IntRange(1), default=50, show_default=True,
              help="incremental_retrain: a full retrain every this many batches.")
@click.option("--finetune-every", type=click.IntRange(2), default=10, show_default=True,
              help="streaming: a streaming update every this many batches.")
@click.option("--replay", type=click.FloatRange(0), default=1.0, show_default=True,
              help="streaming: older edges replayed per recent edge (drawn mostly from just before the window).")
@click.option("--finetune-rounds", type=click.IntRange(0), default=2, show_default=True,
              help="streaming: rounds of the response search per update (0: biases only).")
@click.option("--models", default=None, help="Comma-separated subset of the models (all by default).")
@click.option("--engine", type=click.Choice(["memory", "neo4j"]), default="memory", show_default=True,
              help="neo4j: `incremental` runs through ingest, refresh and the served query (empty graph needed).")
@model_options
@click.option("--lin-topk", type=click.IntRange(0), default=0, show_default=True,
              help="If > 0, the linear filter keeps only each item's this many nearest items.")
@click.option("--bias-l2", type=click.FloatRange(0), default=None, help="L2 weight of the item biases' fit at training.")
@click.option("--item-trend", type=click.FloatRange(0), default=None,
              help="With --item-bias: a live trend prior, new adopters decayed with this half-life in days (0: none).")
@click.option("--trend-weight", type=click.FloatRange(0), default=None, help="Weight of the --item-trend prior.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Write results.json/md/png here.")
def evaluate_stream(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, k, train_fraction,
                    batch_size, batch_minutes, retrain_every, finetune_every, replay, finetune_rounds, models, engine,
                    lin_weights, lin_user_weights, lin_topk, alpha, item_bias, bias_l2, item_trend, trend_weight, out):
    """Prequential evaluation on any event log: score each micro-batch's new (user, item) events, then learn it."""
    from app.evaluation import stream as stream_eval
    if fmt == "csv" and not (user_col and item_col and ts_col):
        _fail("--format csv needs --user-col, --item-col and --ts-col")
    if batch_size and batch_minutes:
        _fail("give --batch-size or --batch-minutes, not both")
    chosen = [m.strip() for m in models.split(",")] if models else None
    unknown = set(chosen or ()) - set(stream_eval.MODELS)
    if unknown:
        _fail(f"--models: unknown {', '.join(sorted(unknown))} (known: {', '.join(stream_eval.MODELS)})")
    try:
        result = stream_eval.evaluate(load_config(), path, fmt, dict(
            user_col=user_col, item_col=item_col, ts_col=ts_col, ts_unit=ts_unit, weight_col=weight_col,
            type_col=type_col), k=k, train_fraction=train_fraction, batch_size=batch_size,
            batch_minutes=batch_minutes, retrain_every=retrain_every, finetune_every=finetune_every,
            replay=replay, finetune_rounds=finetune_rounds, models=chosen, engine=engine, lin_weights=lin_weights,
            lin_topk=lin_topk, alpha=alpha, lin_user_weights=lin_user_weights, item_bias=item_bias,
            bias_l2=bias_l2, trend_halflife=item_trend, trend_weight=trend_weight)
    except ValueError as exc:
        _fail(str(exc))
    from app.evaluation import report
    click.echo(report.table(result))
    if out:
        click.echo(f"wrote {report.write(result, out)}/results.json, results.md, results.png")


def _history(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, cut, horizon):
    """The event file as a plain history and the cut (given, else the latest with `horizon` days after it)."""
    import pandas as pd

    from app.evaluation import history
    if fmt == "csv" and not (user_col and item_col and ts_col):
        _fail("--format csv needs --user-col, --item-col and --ts-col")
    events = history.read(path, fmt, user_col=user_col, item_col=item_col, ts_col=ts_col, ts_unit=ts_unit,
                          weight_col=weight_col, type_col=type_col)
    return events, pd.Timestamp(cut) if cut else history.default_cut(events, horizon)


def cut_options(f):
    """The cut date and the horizon after it."""
    for option in reversed([
        click.option("--cut", default=None, help="Calibration ends here (YYYY-MM-DD; default: the latest day with "
                                                 "--horizon days of data after it)."),
        click.option("--horizon", type=click.IntRange(1), default=90, show_default=True,
                     help="Days after the cut that make the label."),
        click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON."),
    ]):
        f = option(f)
    return f


@evaluate.command("churn")
@event_file_options
@cut_options
@click.option("--min-days", type=click.IntRange(1), default=2, show_default=True,
              help="Users scored: those with at least this many active days before the cut.")
def evaluate_churn(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, cut, horizon, out,
                   min_days):
    """Churn (no event in the --horizon days after --cut): ours (LightGBM, settings chosen on an earlier
    cut) against recency, frequency, the overdue formula and BG/NBD; ROC AUC and precision at the top 10%."""
    from graph_models import churneval
    events, cut = _history(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, cut, horizon)
    try:
        report = churneval.run(events, cut, horizon, min_days)
    except ValueError as exc:
        _fail(str(exc))
    click.echo(json.dumps(report, indent=2, default=str))
    click.echo(f"\n{'model':<16} {'AUC':>7} {'P@10%':>7}")
    for key in ("ours", *churneval.BASELINES):
        click.echo(f"{key:<16} {report[key]['auc']:>7.4f} {report[key]['precision@10%']:>7.4f}")
    _write(report, out)


@evaluate.command("audience")
@event_file_options
@cut_options
@click.option("--k", type=click.IntRange(1), default=100, show_default=True, help="Audience size for recall.")
def evaluate_audience(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, cut, horizon, out, k):
    """Audience: for each item bought in the --horizon days after --cut, rank every user active before it;
    recall@k and AUC of ours (as the API serves it; the full score over every user; the vector cosine)
    against the most active users and ItemKNN."""
    from app.evaluation.audience import served
    from graph_models import ModelConfig, audienceeval
    events, cut = _history(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, cut, horizon)
    cfg = load_config()
    scorers, chosen, model = audienceeval.scorers(events, cut, ModelConfig(dim=cfg.embed_dim, sharp_dim=cfg.sharp_dim),
                                                  budget_s=cfg.train_minutes * 60)
    # what GET /v1/items/<id>/audience answers (IG_AUDIENCE_CANDIDATES candidates), first
    scorers = {"ours_served": served(model, cfg.audience_candidates), **scorers}
    chosen["audience_candidates"] = cfg.audience_candidates
    report = {**audienceeval.run(events, cut, scorers, horizon, k), "chosen": chosen}
    click.echo(json.dumps(report, indent=2, default=str))
    click.echo(f"\n{'model':<14} {'R@' + str(k):>7} {'AUC':>7} {'R@' + str(k) + ' new':>9} {'AUC new':>8}")
    for key in scorers:
        a, n = report[key]["all"], report[key]["new"]
        click.echo(f"{key:<14} {a[f'recall@{k}']:>7.4f} {a['auc']:>7.4f} {n[f'recall@{k}']:>9.4f} {n['auc']:>8.4f}")
    _write(report, out)


def _write(report: dict, out: str | None) -> None:
    if out:
        with open(out, "w") as fh:
            json.dump(report, fh, indent=2, default=str)


def _evaluate(run, name: str, epochs: int | None, out: str | None, **sizes) -> None:
    """Run one evaluation with TensorBoard logs under IG_HOME/runs and print its table."""
    from datetime import datetime, timezone

    from graph_models import ModelConfig
    mcfg = ModelConfig(**sizes)
    if epochs is not None:
        mcfg.epochs = epochs
    log_dir = load_config().home / "runs" / f"eval-{name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    click.echo(f"TensorBoard logs: {log_dir} (tensorboard --logdir {log_dir.parent})")
    report = run(mcfg, str(log_dir))
    _print_report(report, ("model", "ease", "gfcf", "itemknn", "popularity"), out)


def _print_report(report: dict, keys, out: str | None) -> None:
    """An evaluation's JSON (without per-trial histories), its table, and the JSON file if asked."""
    click.echo(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2, default=str))
    click.echo(f"\n{'model':<12} {'Recall@20':>10} {'NDCG@20':>10}")
    for key in keys:
        if report.get(key, {}).get("recall@20") is not None:
            click.echo(f"{key:<12} {report[key]['recall@20']:>10.4f} {report[key]['ndcg@20']:>10.4f}")
    if out:
        with open(out, "w") as fh:
            json.dump(report, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
