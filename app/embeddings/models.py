"""Model versions: checkpoints on disk, the (:Model) node that says which is current."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np

import torch

from app import cypher
from app.config import Config
from graph_models.checkpoint import load_checkpoint


@dataclass
class LoadedModel:
    """A checkpoint ready for exact inference (float64, eval mode)."""

    version: str
    model: torch.nn.Module
    mcfg: object
    ref_ms: int
    item_rows: dict[str, int]

    @cached_property
    def u0(self) -> np.ndarray:
        """The users' shared layer-0 input (users have no parameters of their own)."""
        with torch.no_grad():
            u0 = self.model.user_input(1)[0].numpy().copy()
        u0.flags.writeable = False  # shared by every run: never updated in place
        return u0

    @property
    def buckets(self) -> tuple[int, int]:
        """(category, token) hash bucket counts of the model's feature tables."""
        return self.mcfg.category_buckets, self.mcfg.token_buckets


_cache: dict[str, LoadedModel] = {}
_lock = threading.Lock()


def load(path: str, version: str) -> LoadedModel:
    """Load a checkpoint once per process."""
    with _lock:
        if version not in _cache:
            model, mcfg, meta = load_checkpoint(path)
            rows = {item_id: row for row, item_id in enumerate(meta["item_ids"])}
            _cache[version] = LoadedModel(version, model.double().eval(), mcfg, int(meta["ref_ms"]), rows)
        return _cache[version]


def current_info(driver, cfg: Config) -> dict | None:
    """The current (:Model) node as a dict, or None before the first training."""
    with driver.session(database=cfg.neo4j_database) as s:
        record = s.run(cypher.MODEL_CURRENT).single()
    if record is None:
        return None
    info = dict(record)
    info["metrics"] = json.loads(info["metrics"] or "{}")
    return info


def current(driver, cfg: Config) -> LoadedModel | None:
    """The current model, loaded, or None before the first training."""
    info = current_info(driver, cfg)
    return load(info["path"], info["version"]) if info else None
