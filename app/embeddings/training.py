"""Train a new model version on the graph in Neo4j, register it, re-embed, make it current."""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import scipy.sparse as sp

from app import cypher
from app.config import Config
from app.embeddings import models, store
from app.embeddings.full import embed_full
from graph_models import ModelConfig
from graph_models.checkpoint import save_checkpoint
from graph_models.logeval import choose_and_fit
from graph_models.spectral import table_topk
from graph_models.train import build

log = logging.getLogger(__name__)


def model_config(cfg: Config, **overrides) -> ModelConfig:
    """The model hyper-parameters for this deployment: sizes (the search's bounds), budget, and the
    settings fixed in the environment (the rest keep ModelConfig's defaults until the search moves them)."""
    mcfg = ModelConfig(dim=cfg.embed_dim, sharp_dim=cfg.sharp_dim, max_minutes=cfg.train_minutes,
                       search_trials=cfg.search_trials, bias_l2=cfg.bias_l2, trend_halflife=cfg.item_trend,
                       trend_weight=cfg.trend_weight, table_edges=cfg.table_edges, table_k=cfg.table_k,
                       table_mb=cfg.table_mb)
    for key, value in {**fixed_settings(cfg), **overrides}.items():
        if value is not None:
            setattr(mcfg, key, value)
    if mcfg.trend_weight and not (mcfg.bias_temperature > 0 and mcfg.trend_halflife > 0):
        raise ValueError("a trend weight needs item biases (IG_ITEM_BIAS, --item-bias) and a trend half-life "
                         "(IG_ITEM_TREND, --item-trend)")
    return mcfg


def fixed_settings(cfg: Config) -> dict:
    """The model settings the environment fixes (ModelConfig names), which the search leaves alone."""
    out = {"lin_weights": cfg.lin_weights, "lin_user_weights": cfg.lin_user_weights, "alpha": cfg.model_alpha,
           "bias_temperature": cfg.item_bias}
    return {k: v for k, v in out.items() if v is not None}


def _edge_matrix(snap: store.Snapshot, values) -> sp.csr_matrix:
    """Users x items matrix of one value per snapshot edge, in the snapshot's rows and columns."""
    uidx = {u: k for k, u in enumerate(snap.user_ids)}
    iidx = {it["id"]: k for k, it in enumerate(snap.items)}
    rows = np.fromiter((uidx[u] for u in snap.edges_u), dtype=np.int64, count=len(snap.edges_u))
    cols = np.fromiter((iidx[i] for i in snap.edges_i), dtype=np.int64, count=len(snap.edges_i))
    return sp.csr_matrix((values, (rows, cols)), shape=(len(uidx), len(iidx)))


def weights(snap: store.Snapshot, meta: dict) -> sp.csr_matrix:
    """Users x items aggregation weights of a snapshot under a version's `meta` (scale of its reference time)."""
    csr = _edge_matrix(snap, np.maximum(np.asarray(snap.w, dtype=np.float64), 0.0) * models.weight_scale(meta))
    csr.eliminate_zeros()
    return csr


def train_and_publish(driver, cfg: Config, progress: bool = True, owner: str | None = None,
                      train_model: bool = True, **overrides) -> dict:
    """Train on the current graph, save a checkpoint, re-embed everything, then switch versions.

    `train_model=False` publishes the untrained responses (GF-CF's; benchmarks of refresh cost).
    """
    started = time.monotonic()
    mcfg = model_config(cfg, **overrides)
    biased = mcfg.bias_temperature > 0
    with driver.session(database=cfg.neo4j_database) as session:
        snap = session.execute_read(lambda tx: store.export(tx, times=train_model or biased))
        latest = session.run(cypher.LATEST_EVENT_TS).single()["latest"]
    if not snap.edges_u:
        raise ValueError("the graph has no interactions to train on; load events first")
    # What the version's vectors depend on belongs to the version, not to the process that computes them.
    meta = {"ref_ms": int(latest or snap.taken_at), "decay_anchor_ms": cfg.decay_anchor_ms,
            "half_life_days": cfg.half_life_days, "item_ids": [it["id"] for it in snap.items]}
    graph = weights(snap, meta)
    version = new_version()
    result = {"metrics": {}, "seconds": 0.0, "epochs": 0, "popularity": {}}
    search = None
    if train_model:
        # Settings are chosen on each shopper's latest interactions (their next items), held out.
        first = _edge_matrix(snap, np.asarray(snap.first, dtype=np.float64))
        # The items' content, described once: EASE may weigh it (searched), and the content map reads it.
        items, described, feats = None, None, None
        if cfg.content_map != "off":
            from graph_models.coldstart import describe
            items = [{"title": it.get("title"), "category": it.get("category"), "price": it.get("price")}
                     for it in snap.items]
            described = describe(items, mcfg.seed)
            feats = described[1] if described[0] is not None else None
        model, result, _ = choose_and_fit(graph, first, mcfg, fixed_settings(cfg),
                                          mcfg.max_minutes * 60 if mcfg.max_minutes else None, progress,
                                          str(cfg.home / "runs" / version), content=feats)
        mcfg, search = model.cfg, result.get("search")
        if cfg.content_map != "off":
            result["content"] = _fit_content(model, graph, items, described, progress,
                                             str(cfg.home / "runs" / version), train=cfg.content_map == "on",
                                             score=cfg.content_score, first=first)
    else:
        mcfg = replace(mcfg, lin_topk=table_topk(graph.nnz, graph.shape[1], mcfg))  # as `fit` sets it
        model = build(graph, mcfg)
    metrics = {k: v for k, v in result["metrics"].items()
               if isinstance(v, (int, float)) and k not in ("epoch", "trial", "seconds")}
    path = _publish(driver, cfg, mcfg, model, version, meta, metrics, result["epochs"], search=search)
    lm = models.load(str(path), version)
    log.info("trained %s in %.1fs: %s", version, result["seconds"], metrics)
    # The switch to the new version commits with the full run's last write (fenced by the lease).
    embedded = embed_full(driver, cfg, lm, progress=progress, owner=owner, reason=f"new model version {version}",
                          publish=True)
    return {"version": version, "metrics": metrics, "popularity": result["popularity"],
            "settings": chosen_settings(mcfg),
            "train_seconds": round(result["seconds"], 2),
            "epochs": result["epochs"], "embed": embedded, "content": result.get("content"), "seconds": round(time.monotonic() - started, 2),
            "users": len(snap.user_ids), "items": len(snap.items), "edges": len(snap.edges_u),
            "checkpoint": str(path), "runs": str(cfg.home / "runs" / version) if train_model else None}


def _fit_content(model, graph: sp.csr_matrix, items: list, described, progress: bool, log_dir: str,
                 train: bool = True, score: str = "mix", first: sp.csr_matrix | None = None) -> dict:
    """Fit the version's content part (the map: learned with `train`, else content-kNN; its items scored
    by `score`, ColdConfig.score) on the snapshot's item metadata `items` (`described`: coldstart.describe
    of them; `first`: the edges' first times, for a version that reads a trend); the learned map's curves
    go to TensorBoard next to the settings search's. Returns the map's choice and validation."""
    from graph_models.coldstart import ColdConfig, fit_content
    from graph_models.train import _tensorboard
    writer = _tensorboard(log_dir) if train else None
    feats = described[1] if described[0] is not None else None
    part, report = fit_content(lambda g: build(g, model.cfg, content=feats), graph, items,
                               ColdConfig(seed=model.cfg.seed, score=score),
                               progress=progress, writer=writer, train=train, first=first, described=described)
    if writer is not None:
        writer.close()
    model.content = part
    log.info("content map: %s", report.get("skipped") or report["chosen"])
    return {k: v for k, v in report.items() if k != "history"}


def new_version() -> str:
    """A new model version name: UTC time and a random part."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def publish(driver, cfg: Config, mcfg: ModelConfig, model, meta: dict, owner: str | None, reason: str,
            metrics: dict | None = None, lineage: dict | None = None, progress: bool = False) -> dict:
    """Register a model as a new version and make it current with a full re-embed under it (the switch
    commits with the re-embed's last write); `meta` holds item_ids in model-row order and ref_ms."""
    version = new_version()
    meta = {"decay_anchor_ms": cfg.decay_anchor_ms, "half_life_days": cfg.half_life_days, **meta}
    path = _publish(driver, cfg, mcfg, model, version, meta, metrics or {}, 0, lineage)
    lm = models.load(str(path), version)
    embedded = embed_full(driver, cfg, lm, progress=progress, owner=owner, reason=f"{reason} {version}",
                          publish=True)
    return {"version": version, "embed": embedded, "checkpoint": str(path)}


def chosen_settings(mcfg: ModelConfig) -> dict:
    """The settings that decide a version's ranking, as served."""
    keys = ("rank", "alpha", "sharp_alpha", "lin_weight", "lin_weights", "lin_user_weights", "lin_beta",
            "ease_lambda", "ease_weight", "ease_content", "bias_temperature", "trend_halflife", "trend_weight")
    d = mcfg.to_dict()
    return {k: d[k] for k in keys}


def _publish(driver, cfg: Config, mcfg: ModelConfig, model, version: str, meta: dict, metrics: dict,
             epochs: int, lineage: dict | None = None, search: dict | None = None):
    """Save the checkpoint and create its (:Model) node (not yet current); `lineage` records a
    fine-tune: {"fine_tuned_from", "tuned_on", "check"}; `search` the settings search (chosen
    settings and each trial's validation figures)."""
    lineage = lineage or {}
    trained_at = datetime.now(timezone.utc)
    cfg.models_path.mkdir(parents=True, exist_ok=True)
    path = cfg.models_path / f"{version}.pt"
    save_checkpoint(path, model, mcfg, {**meta, "version": version, "metrics": metrics,
                                        "trained_at": trained_at.isoformat(), "epochs": epochs})
    lm = models.load(str(path), version)
    with driver.session(database=cfg.neo4j_database) as session:
        session.execute_write(lambda tx: tx.run(
            cypher.MODEL_CREATE, version=version, trained_at=trained_at.isoformat(),
            metrics=json.dumps(metrics), config=json.dumps(mcfg.to_dict()), path=str(path),
            ref_ms=meta["ref_ms"], scale=lm.scale, item_norm=lm.item_norm,
            fine_tuned_from=lineage.get("fine_tuned_from"),
            tuned_on=json.dumps(lineage["tuned_on"]) if lineage.get("tuned_on") else None,
            check=json.dumps(lineage["check"]) if lineage.get("check") else None,
            search=json.dumps(search) if search else None).consume())
    return path
