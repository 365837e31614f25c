"""Train a new model version on the graph in Neo4j, register it, re-embed, make it current."""
from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timezone

import numpy as np
import scipy.sparse as sp
import torch

from app import cypher
from app.config import Config
from app.embeddings import models, store
from app.embeddings.features import DAY_MS, item_features
from app.embeddings.full import embed_full
from graph_models import InterestSAGE, ModelConfig
from graph_models.checkpoint import save_checkpoint
from graph_models.graph import graph_from_csr
from graph_models.split import holdout
from graph_models.train import train

log = logging.getLogger(__name__)


def model_config(cfg: Config, **overrides) -> ModelConfig:
    """The model hyper-parameters for this deployment (dimension and depth from Config)."""
    mcfg = ModelConfig(dim=cfg.embed_dim, layers=cfg.layers)
    for key, value in overrides.items():
        if value is not None:
            setattr(mcfg, key, value)
    return mcfg


def train_and_publish(driver, cfg: Config, progress: bool = True, owner: str | None = None,
                      train_model: bool = True, **overrides) -> dict:
    """Train on the current graph, save a checkpoint, re-embed everything, then switch versions.

    `train_model=False` publishes the freshly initialised weights (benchmarks of refresh cost).
    """
    started = time.monotonic()
    with driver.session(database=cfg.neo4j_database) as session:
        snap = session.execute_read(lambda tx: store.export(tx))
        latest = session.run(cypher.LATEST_EVENT_TS).single()["latest"]
    if not snap.edges_u:
        raise ValueError("the graph has no interactions to train on; load events first")
    # Weights are decayed to the newest event, so log1p compresses them on a stable scale.
    ref_ms = int(latest or snap.taken_at)
    mcfg = model_config(cfg, **overrides)
    model = InterestSAGE(len(snap.items), mcfg)
    result = {"metrics": {}, "seconds": 0.0, "epochs": 0}
    if train_model:
        result = _train(snap, ref_ms, cfg, mcfg, model, progress)
    metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    version, path = _publish(driver, cfg, mcfg, model, snap, ref_ms, metrics, result["epochs"])
    log.info("trained %s in %.1fs: %s", version, result["seconds"], metrics)
    # The switch to the new version commits with the full run's last write (fenced by the lease).
    embedded = embed_full(driver, cfg, models.load(str(path), version), progress=progress, owner=owner,
                          reason=f"new model version {version}", publish=True)
    return {"version": version, "metrics": metrics, "train_seconds": round(result["seconds"], 2),
            "epochs": result["epochs"], "embed": embedded, "seconds": round(time.monotonic() - started, 2),
            "users": len(snap.user_ids), "items": len(snap.items), "edges": len(snap.edges_u),
            "checkpoint": str(path)}


def _train(snap: store.Snapshot, ref_ms: int, cfg: Config, mcfg: ModelConfig, model, progress: bool) -> dict:
    """Fit the model on the snapshot, 10% of each user's edges held out for early stopping."""
    uidx = {u: k for k, u in enumerate(snap.user_ids)}
    iidx = {it["id"]: k for k, it in enumerate(snap.items)}
    rows = np.array([uidx[u] for u in snap.edges_u])
    cols = np.array([iidx[i] for i in snap.edges_i])
    factor = np.exp2(-(ref_ms - cfg.decay_anchor_ms) / (cfg.half_life_days * DAY_MS))
    w = np.asarray([x or 0.0 for x in snap.w], dtype=np.float64) * factor
    fit, val = holdout(sp.csr_matrix((w, (rows, cols)), shape=(len(uidx), len(iidx))), 0.1, mcfg.seed)
    feats = item_features(snap.items, (mcfg.category_buckets, mcfg.token_buckets))
    feats["price"] = feats["price"].float()
    return train(graph_from_csr(fit), model, mcfg, item_feats=feats, val=val, progress=progress)


def _publish(driver, cfg: Config, mcfg: ModelConfig, model, snap, ref_ms: int, metrics: dict,
             epochs: int) -> tuple[str, object]:
    """Save the checkpoint and create its (:Model) node (not yet current)."""
    trained_at = datetime.now(timezone.utc)
    version = f"{trained_at:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    cfg.models_path.mkdir(parents=True, exist_ok=True)
    path = cfg.models_path / f"{version}.pt"
    meta = {"version": version, "item_ids": [it["id"] for it in snap.items], "ref_ms": ref_ms,
            "metrics": metrics, "trained_at": trained_at.isoformat(), "epochs": epochs}
    save_checkpoint(path, model, mcfg, meta)
    with driver.session(database=cfg.neo4j_database) as session:
        session.execute_write(lambda tx: tx.run(
            cypher.MODEL_CREATE, version=version, trained_at=trained_at.isoformat(),
            metrics=json.dumps(metrics), config=json.dumps(mcfg.to_dict()), path=str(path),
            ref_ms=ref_ms).consume())
    return version, path
