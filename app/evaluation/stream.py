"""`interest-graph evaluate stream`: read an event file, replay it prequentially, compare the models."""
from __future__ import annotations

import math
import time

from app.config import Config
from app.embeddings.training import model_config
from app.evaluation import events
from graph_models import stream as prequential

MODELS = ("popularity", "itemknn", "static", "incremental", "incremental_retrain", "streaming")
DEFAULT_BATCHES = 200


def _served(cfg: Config):
    """recommend(user_id, k) -> item ids, through the API's own view (in process)."""
    from app import create_app
    client = create_app(cfg).test_client()

    def recommend(user_id, k):
        answer = client.get(f"/v1/users/{user_id}/recommendations", query_string={"k": k})
        return [r["item_id"] for r in answer.get_json()["results"]] if answer.status_code == 200 else []
    return recommend


def evaluate(cfg: Config, path, fmt: str, columns: dict, k: int = 20, train_fraction: float = 0.8,
             batch_size: int | None = None, batch_minutes: float | None = None, retrain_every: int = 50,
             finetune_every: int = 10, replay: float = 1.0, models=None, engine: str = "memory",
             progress: bool = True, lin_weights: str = "raw", lin_topk: int = 0, alpha: float | None = None,
             lin_user_weights: str | None = None, item_bias: float | None = None, finetune_rounds: int = 2,
             **model_settings) -> dict:
    """The stream comparison on an event file; with engine "neo4j", `incremental` is measured through
    the real ingest, refresh and recommendation path (on an empty graph) instead of in memory.

    `lin_weights`, `lin_user_weights` and `lin_topk` choose our models' linear filter and `alpha` the
    starting weight of their spectral part, `item_bias` the temperature of their item biases;
    `model_settings` are further ModelConfig fields (`graph_models.ModelConfig`; None keeps its default); the
    served query computes the default filter only, so the Neo4j engine takes the default filter alone."""
    if engine == "neo4j" and (lin_weights != "raw" or lin_user_weights not in (None, "raw") or lin_topk or item_bias):
        raise ValueError("--engine neo4j serves the default linear filter only "
                         "(no --lin-weights, --lin-user-weights, --lin-topk, --item-bias)")
    event_log = events.read(cfg, events.batches(path, fmt, **columns), train_fraction)
    stream = event_log.stream
    start = prequential.start_of_test(stream, train_fraction)
    if start >= len(stream.ts):
        raise ValueError("no events after the training part: lower --train-fraction")
    if not batch_size and not batch_minutes:
        batch_size = max(1, math.ceil((len(stream.ts) - start) / DEFAULT_BATCHES))
    mcfg = model_config(cfg, k=k, search_trials=0, lin_weights=lin_weights, lin_topk=lin_topk, alpha=alpha,
                        lin_user_weights=lin_user_weights, bias_temperature=item_bias, **model_settings)
    started = time.monotonic()
    trained = prequential.train_at(stream, start, mcfg, progress=progress)
    train_seconds = round(time.monotonic() - started, 2)
    result = prequential.evaluate_stream(
        stream, mcfg, train_fraction, k, batch_size, batch_minutes, retrain_every, finetune_every,
        replay=replay, models=models, progress=progress, trained=trained, rounds=finetune_rounds)
    result["protocol"].update(format=fmt, path=str(path), engine=engine, ingest=dict(event_log.counts),
                              train_seconds=train_seconds)
    if engine == "neo4j":
        from app.db import get_driver
        from app.evaluation import replay as neo4j_replay
        from app.worker import Worker
        bounds = prequential.batch_bounds(stream, start, batch_size, batch_minutes)
        with Worker(cfg).holding() as holder:
            served = neo4j_replay.run(get_driver(cfg), cfg, event_log, start, bounds, trained[0], mcfg, _served(cfg),
                                      holder.owner, k=k, progress=progress)
        result["models"]["incremental"] = {key: served[key] for key in ("hr", "ndcg", "mrr", "seconds")}
        result["protocol"]["neo4j_events_scored"] = served["events_scored"]
    return result
