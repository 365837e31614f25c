"""Commands that train, embed and refresh: jobs run by the lease holder, and the pipeline's status."""
from __future__ import annotations

import json
import sys

import click

from app.cli.base import fail, main
from app.config import load_config
from app.db import get_driver


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
        fail("no trained model yet: run `interest-graph train` first")
    click.echo(json.dumps(_finished_job("reindex", {"mode": "full"})["result"], indent=2))


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
        fail(f"job {job['id']} ({kind}) failed: {job.get('error')}")
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
