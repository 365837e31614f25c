"""Model versions: checkpoints on disk, the (:Model) node that says which is current."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from app import cypher
from app.config import Config
from app.db import read_session
from graph_models.checkpoint import load_checkpoint

DAY_MS = 86_400_000.0


class Cold(NamedTuple):
    """Items that take their rows from content (positions in the items asked about), those rows, and
    their attention over the version's rows (None for a version that scores them by their rows alone)."""

    pos: np.ndarray
    x: np.ndarray
    q: np.ndarray
    a: sp.csr_matrix | None


HEAD = 8  # columns of q that a score's bound reads: with two norms, 40 bytes a candidate


def aligned(a: np.ndarray, dtype, to: int = 64) -> np.ndarray:
    """`a` copied as `dtype` from a `to`-byte boundary: a large allocation starts 16 bytes past one, so every
    row of a 64- and 16-dimensional float32 table (320 bytes) would span six cache lines, not five, when a
    request gathers its candidates' rows."""
    size = a.size * np.dtype(dtype).itemsize
    raw = np.empty(size + to, dtype=np.uint8)
    start = -raw.ctypes.data % to
    out = raw[start:start + size].view(dtype).reshape(a.shape)
    out[...] = a
    return out


def weight_scale(meta: dict) -> float:
    """2^-((R - A) / half-life) of a version's `meta`: per unit of stored edge weight, its aggregation weight.

    Stored weights grow as 2^((t - A) / half-life) from the ingest anchor A; this brings those of the
    version's reference time R near 1. Every score is linear in it, so rankings do not depend on it;
    it is kept with the version (not read from the process's settings) so that every process
    computes the same vectors for one version.
    """
    return float(2.0 ** (-(meta["ref_ms"] - meta["decay_anchor_ms"]) / (meta["half_life_days"] * DAY_MS)))


@dataclass
class LoadedModel:
    """A checkpoint ready for exact inference (float64, eval mode), with what its vectors depend on."""

    version: str
    model: torch.nn.Module
    mcfg: object
    meta: dict
    item_rows: dict[str, int]

    @property
    def scale(self) -> float:
        """Aggregation weight per unit of stored edge weight (see `weight_scale`)."""
        return weight_scale(self.meta)

    @cached_property
    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, q) of every version row, plus a last zero row for items the version does not know."""
        rows = torch.arange(self.model.num_items + 1)  # row num_items is outside the version: zero
        with torch.no_grad():
            x, q = self.model.item_input(rows).numpy(), self.model.item_embedding(rows).numpy()
        x.flags.writeable = q.flags.writeable = False  # shared by every run: never updated in place
        return x, q

    @cached_property
    def q32(self) -> np.ndarray:
        """The item table q in float32, as the offline Scorer scores: the API reads it whole per answer,
        and half the bytes is most of that product's time on a busy host (docs/benchmarks.md)."""
        out = aligned(self.tables[1], np.float32)
        out.flags.writeable = False
        return out

    @cached_property
    def q_bound(self) -> np.ndarray:
        """Per version row, q's first HEAD columns, the norm of the rest and of the whole row (float32): what
        bounds p . q_j without reading the row, in a table small enough to stay in cache (app/serving/scoring.py)."""
        q = self.q32.astype(np.float64)
        out = np.hstack([q[:, :HEAD], np.linalg.norm(q[:, HEAD:], axis=1)[:, None], np.linalg.norm(q, axis=1)[:, None]])
        out = np.ascontiguousarray(out, dtype=np.float32)
        out.flags.writeable = False
        return out

    @cached_property
    def bias(self) -> np.ndarray | None:
        """Item biases of every version row and 0 for the zero row, or None for a version without them."""
        if not self.model.biased:
            return None
        out = np.append(self.model.bias.numpy(), 0.0)
        out.flags.writeable = False
        return out

    @cached_property
    def ease(self) -> np.ndarray | None:
        """EASE's matrix over the version's rows in float32, with a last zero row and column for items the
        version does not know, or None for a version whose score has no EASE term."""
        if not self.model.eased:
            return None
        n = self.model.num_items
        out = np.zeros((n + 1, n + 1), dtype=np.float32)
        out[:n, :n] = self.model.ease.numpy()
        out.flags.writeable = False
        return out

    @cached_property
    def item_norm(self) -> float:
        """M: the largest item embedding norm of the version (1 for a degenerate all-zero one)."""
        q = self.tables[1]
        return float(np.sqrt((q * q).sum(axis=1)).max()) or 1.0

    def content_rows(self, items) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix] | None:
        """(x, q) table rows, float64, of items the version has no row for, from their metadata (dicts of
        title, description, attributes, category, price) through the version's learned content map, and
        their attention over the version's rows (items x rows CSR); None for a version trained without
        content (such items keep the zero row)."""
        part = self.model.content
        return None if part is None else part.rows(items, *self.tables)

    @property
    def mixes(self) -> bool:
        """Whether the version scores items without a trained row by the attention mix of the shopper's
        full scores of the known items they attend to (graph_models.coldstart.ColdConfig.score)."""
        return self.model.content is not None and self.model.content.mixes

    @cached_property
    def trained_rows(self) -> np.ndarray | None:
        """Which table rows the content part attends to (the version's items with edges, plus False for
        the zero row), or None for a version without content."""
        part = self.model.content
        if part is None:
            return None
        out = np.zeros(self.model.num_items + 1, dtype=bool)
        out[part.known] = True
        out.flags.writeable = False
        return out

    def cold(self, items: list[dict]) -> Cold:
        """Which of `items` (dicts of id, title, category, price) take their table rows from their content,
        and those rows (float64) with, for a version that mixes, their attention over the version's rows.
        They are the items without a trained row (new since the version, or without edges when it was
        trained) that have a title or a category, under a version with a content part; every other item
        keeps its table row (the zero row if it has none)."""
        d = self.model.out_dim
        none = Cold(np.zeros(0, dtype=np.int64), np.zeros((0, d)), np.zeros((0, d)),
                    sp.csr_matrix((0, self.model.num_items + 1)) if self.mixes else None)
        known = self.trained_rows
        if known is None or not items:
            return none
        rows = self.rows([it["id"] for it in items])
        pos = np.array([k for k, it in enumerate(items) if not known[rows[k]] and described(it)], dtype=np.int64)
        if not len(pos):
            return none
        x, q, a = self.content_rows([items[k] for k in pos])
        return Cold(pos, x, q, a if self.mixes else None)

    def rows(self, item_ids) -> np.ndarray:
        """Table rows of items (the zero row for items new since the version)."""
        n = self.model.num_items
        return np.fromiter((self.item_rows.get(i, n) for i in item_ids), dtype=np.int64)


def described(item: dict) -> bool:
    """Whether an item's metadata can place it: a title or a category (a price alone says too little)."""
    return bool(item.get("title") or item.get("category"))


_cache: dict[str, LoadedModel] = {}
_lock = threading.Lock()


def load(path: str, version: str) -> LoadedModel:
    """Load a checkpoint once per process."""
    with _lock:
        if version not in _cache:
            model, mcfg, meta = load_checkpoint(path)
            rows = {item_id: row for row, item_id in enumerate(meta["item_ids"])}
            model = model.double().eval()
            model.ease = model.ease.float()  # EASE's matrix stays in float32, as it is served
            _cache[version] = LoadedModel(version, model, mcfg, meta, rows)
        return _cache[version]


def current_info(driver, cfg: Config) -> dict | None:
    """The current (:Model) node as a dict, or None before the first training."""
    with read_session(driver, cfg) as s:
        record = s.run(cypher.MODEL_CURRENT).single()
    if record is None:
        return None
    info = dict(record)
    info["metrics"] = json.loads(info["metrics"] or "{}")
    for key in ("tuned_on", "check"):
        info[key] = json.loads(info[key]) if info.get(key) else None
    return info


def current(driver, cfg: Config) -> LoadedModel | None:
    """The current model, loaded, or None before the first training."""
    info = current_info(driver, cfg)
    return load(info["path"], info["version"]) if info else None
