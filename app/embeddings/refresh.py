"""Incremental refresh: recompute exactly the embeddings a change reaches, by deltas.

Each node stores, per layer l, the weighted sum a_l of its neighbours' layer-(l-1) vectors and
its own layer vectors h_l (see `state`). A changed edge (u, i) or node x then changes a_l only by
`w_new * h_new - w_old * h_old` along the edges that touch a changed node, so a run reads the
edges of the nodes whose vectors changed, not the whole L-hop neighbourhood of every affected
node (the idea of InkStream and Ripple). Everything is float64, so the result equals a full
recompute to ~1e-12.

A refresh has two sides (docs/architecture.md): the users' side (`_Incremental`, one transaction)
and the items' last layer (`items_side`, bounded chunks), which is each changed user's fan-out to
all its items.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np
import torch

from app.config import Config
from app.embeddings import store
from app.embeddings.features import item_features, omega
from app.embeddings.full import embed_full, interrupted
from app.embeddings.models import LoadedModel
from app.embeddings.state import DEG, ITEM, USER, a_key, first_h, h_key, pack, unpack

log = logging.getLogger(__name__)
OTHER = {USER: ITEM, ITEM: USER}


# A recomputed vector within EPS of the stored one counts as unchanged: it is neither written nor
# propagated. This is what keeps a popular item from dragging in all its users: with users' shared
# input, an item's layer-1 mean is the same vector whatever its users are, so a new edge changes it
# only by float rounding (~1e-16). Comparing with the *stored* vector each time keeps every stored
# vector within EPS of the exact one, so errors cannot accumulate across runs.
EPS = 1e-9


class TooLarge(Exception):
    """The affected set passed the configured share of the graph: a full recompute is cheaper."""


_pace = {"edges_per_s": 4000.0}  # items' side throughput, updated after every chunk


def refresh(driver, cfg: Config, lm: LoadedModel, full: bool = False, progress: bool = False,
            owner: str | None = None, budget_s: float | None = None) -> dict:
    """A refresh: the users' side first, then the items' side until drained (or `budget_s` is spent).

    The users' side (every changed user's embedding, all state but items' last layer) is one
    transaction whose cost grows with the events; the items' side (items' last-layer sums and
    embeddings: the fan-out of each changed user to all its items) follows in bounded chunks.
    With a budget (the worker), new changes are taken between chunks, so users stay fresh while
    a large items' side drains over several runs.
    """
    deadline = None if budget_s is None else time.monotonic() + budget_s
    run = _users_side(driver, cfg, lm, full, progress, owner)
    if run["mode"] == "full":
        return run
    side = {"chunks": 0, "users": 0, "items": 0, "seconds": 0.0}
    while deadline is None or time.monotonic() < deadline:
        # With a budget, chunks of about `propagate_seconds` (at the rate measured so far in this
        # process), each followed by the users' side of whatever arrived meanwhile.
        edges = cfg.propagate_edges if deadline is None else int(
            min(max(_pace["edges_per_s"] * cfg.propagate_seconds, 200), cfg.propagate_edges))
        chunk = items_side(driver, cfg, lm, owner, edges)
        if chunk is None:
            break
        for k in side:
            side[k] = round(side[k] + (1 if k == "chunks" else chunk[k]), 4)
        _pace["edges_per_s"] = chunk["edges"] / max(chunk["seconds"], 1e-3)
        if deadline is not None and _users_side(driver, cfg, lm, False, False, owner)["mode"] == "full":
            break
    run["items_side"] = side
    return run


def _users_side(driver, cfg: Config, lm: LoadedModel, full: bool, progress: bool, owner: str | None) -> dict:
    """One run over the changes since the watermark: incremental when possible, else full."""
    with driver.session(database=cfg.neo4j_database) as session:
        state = store.refresh_state(session)
        reason = ("requested" if full else "interrupted full recompute" if state["full_pending"]
                  else "no watermark yet" if state["watermark"] is None else None)
        if reason is None:
            started = time.monotonic()
            now = store.server_time(session)
            edges, users, items = session.execute_read(store.changes)
            if not (edges or users or items):
                return {"mode": "noop", "seconds": round(time.monotonic() - started, 4)}
            try:
                run = _Incremental(session, cfg, lm, edges, users, items).run()
            except TooLarge as exc:
                reason = str(exc)
            else:
                run.update(mode="incremental", version=lm.version, seconds=round(time.monotonic() - started, 4),
                           finished_at=int(time.time() * 1000))
                writes = run.pop("writes")
                # The revisions this run read: one committed since keeps its node flagged for the next.
                writes["seen"] = {USER: [{"id": r["id"], "rev": r["rev"]} for r in users],
                                  ITEM: [{"id": r["id"], "rev": r["rev"]} for r in items]}
                session.execute_write(lambda tx: _write(tx, lm.version, writes, now, run, owner))
                log.info("incremental refresh: %d edges, %d nodes in %.3fs (%.3fs with the write)", run["changed_edges"],
                         run["nodes"], run["seconds"], time.monotonic() - started)
                return run
    publish = False
    if state["full_pending"]:  # finish the interrupted run under the version it was writing
        lm, publish = interrupted(driver, cfg, state, lm)
    return embed_full(driver, cfg, lm, progress=progress, owner=owner, reason=reason, publish=publish)


def _write(tx, version: str, writes: dict, mark: int, run: dict, owner: str | None) -> None:
    """Everything one users'-side run changes, in its single transaction.

    Locks are taken in the ingest path's order (items by id, then users by id, then edges), so a run
    and concurrent ingest queue instead of deadlocking (a deadlock costs a retry after ~1 s); the
    lease node before them all (the fence, as in every fenced transaction).
    """
    store.check_lease(tx, owner)
    for ntype in (ITEM, USER):
        store.write_nodes(tx, ntype, writes["nodes"][ntype], version)
        store.mark_seen(tx, ntype, writes["seen"][ntype])
    store.mark_edges_changed(tx, writes["edges"])
    store.mark_pending(tx, writes["pending"][USER], writes["pending"][ITEM])
    store.advance(tx, mark, run, owner)


def items_side(driver, cfg: Config, lm: LoadedModel, owner: str | None, max_edges: int) -> dict | None:
    """One chunk of the items' side: pending users' changes into their items' last-layer sums.

    Item i's sum holds, per edge, `ig_wi * ig_hs[u]` (what it saw of u); the chunk adds
    `ig_w * h[u] - ig_wi * ig_hs[u]` for the chunk's users, recomputes those items' embeddings
    and clears the users' pending state, all in one transaction. None when nothing is pending.
    """
    started = time.monotonic()
    L, prev = lm.mcfg.layers, lm.mcfg.layers - 1
    hk = h_key(prev) if prev >= first_h(USER) else None  # users' h_0 is the shared input
    u0 = lm.u0

    def arr(v):
        return np.zeros_like(u0) if v is None else unpack(v)

    def vec(v):  # a user's layer-(L-1) vector
        return u0 if hk is None else arr(v)

    with driver.session(database=cfg.neo4j_database) as session:
        users, items = store.pending(session, min(max_edges, 5000), max_edges)
        chosen, total = [], 0
        for u in users:  # a prefix of about `max_edges` edges, at least one user
            if chosen and total + u["degree"] > max_edges:
                break
            chosen.append(u["id"])
            total += u["degree"]
        if not (chosen or items):
            return None
        sides = store.sides(session, USER, chosen, hk)
        scratch = sorted(x["id"] for x in items if x["scratch"])
        targets = {x["id"] for x in items}.union(*({e[0] for e in r["edges"]} for r in sides.values()))
        state = store.node_state(session, ITEM, sorted(targets), [a_key(L), DEG, h_key(prev)])
        a = {x: arr(v[0]) for x, v in state.items()}
        for x, r in store.sides(session, ITEM, scratch, hk).items():  # lost edges: rebuild the sum
            a[x] = np.zeros_like(u0)
            for uid, w, wi, h, hs in r["edges"]:
                a[x] += w * vec(h) if uid in sides else wi * vec(hs)
        rebuilt = set(scratch)
        for r in sides.values():
            h = vec(r["h"])
            hs = h if r["hs"] is None else vec(r["hs"])
            for i, w, wi in r["edges"]:
                if i in a and i not in rebuilt:
                    a[i] += w * h - wi * hs
        ids = sorted(a)
        if ids:
            sums = np.stack([a[x] for x in ids])
            mean = _mean(sums, np.array([float(state[x][1] or 0.0) for x in ids]))
            h_self = np.stack([arr(state[x][2]) for x in ids])
            with torch.no_grad():
                h = lm.model.combine(L, ITEM, torch.from_numpy(h_self), torch.from_numpy(mean))
                emb = lm.model.final(h).numpy()
        rows = [{"id": x, "props": {a_key(L): pack(sums[n]), "embedding": emb[n].tolist()}}
                for n, x in enumerate(ids)]

        def write(tx):
            store.check_lease(tx, owner)
            store.write_nodes(tx, ITEM, rows, lm.version)
            store.clear_pending(tx, chosen, [x["id"] for x in items])
        session.execute_write(write)
    chunk = {"users": len(chosen), "items": len(ids), "edges": total, "seconds": round(time.monotonic() - started, 4)}
    log.debug("items' side: %(users)d users, %(items)d items, %(edges)d edges in %(seconds).3fs", chunk)
    return chunk


class _Incremental:
    """The state of one delta run; `run()` returns its summary and the writes to make."""

    def __init__(self, session, cfg: Config, lm: LoadedModel, edges, users, items):
        self.s, self.cfg, self.lm, self.L = session, cfg, lm, lm.mcfg.layers
        self.changed = {(e["u"], e["i"]): e for e in edges}
        new_w = omega([e["w"] for e in edges], lm.ref_ms, cfg) if edges else []
        for e, w in zip(edges, new_w):
            e["on"], e["oo"] = float(w), float(e["ig_w"] or 0.0)
        self.scratch = {USER: {u["id"] for u in users}, ITEM: {i["id"] for i in items}}
        self.seen = {USER: users, ITEM: items}
        self.changed_items = items
        self.u0 = lm.u0
        # old[l][t][id] = stored h_l; new[l][t][id] = recomputed h_l (the changed set D_l)
        self.old = [defaultdict(dict) for _ in range(self.L + 1)]
        self.new = [defaultdict(dict) for _ in range(self.L + 1)]
        self.stored_out = {USER: {}, ITEM: {}}  # id -> this layer's stored output, for the EPS test
        self.sent = {}  # user id -> its stored h_{L-1} before this run (what items' sums still hold)
        self.deg_old = {}  # item id -> stored deg, for items' layer 1 (see `_items_layer1`)
        # Everything a run reads is the state stored before it, so each node's state and edges are
        # read once, with all keys: a query costs ~80 us per node looked up, the extra bytes little.
        self.keys = {USER: [DEG] + [a_key(l) for l in range(1, self.L + 1)] + [h_key(l) for l in range(1, self.L)],
                     ITEM: [DEG] + [a_key(l) for l in range(1, self.L)] + [h_key(l) for l in range(self.L)]}
        self.state_cache = {USER: {}, ITEM: {}}  # id -> {key: stored value}
        self.edge_cache = {USER: {}, ITEM: {}}  # id -> its edges
        self.out = {USER: defaultdict(dict), ITEM: defaultdict(dict)}  # id -> props to write
        self.total = None

    # -- reads -------------------------------------------------------------
    def _state(self, ntype: str, ids, keys: list[str]) -> dict[str, list]:
        """Stored `keys` of the nodes that exist, like `store.node_state`, each node read once per run."""
        cache = self.state_cache[ntype]
        missing = sorted({x for x in ids if x not in cache})
        for node_id, vals in store.node_state(self.s, ntype, missing, self.keys[ntype]).items():
            cache[node_id] = dict(zip(self.keys[ntype], vals))
        return {x: [cache[x][k] for k in keys] for x in ids if x in cache}

    def _fetch_h(self, layer: int, ntype: str, ids) -> None:
        """Load stored h_layer of nodes not yet known (users' h_0 is the shared input)."""
        if layer < first_h(ntype):
            return
        known = self.old[layer][ntype]
        missing = [x for x in ids if x not in known]
        for node_id, (vec,) in self._state(ntype, missing, [h_key(layer)]).items():
            known[node_id] = unpack(vec)

    def h(self, layer: int, ntype: str, node_id: str, fresh: bool) -> np.ndarray:
        """h_layer of a node: recomputed if `fresh` and it changed, else as stored (0 if unset)."""
        if fresh and node_id in self.new[layer][ntype]:
            return self.new[layer][ntype][node_id]
        if layer == 0 and ntype == USER:
            return self.u0
        vec = self.old[layer][ntype].get(node_id)
        return np.zeros_like(self.u0) if vec is None else vec

    def _edges_of(self, ntype: str, ids) -> list[dict]:
        """Current edges of nodes, each with the weights (new, old) this run accounts for."""
        cache, own = self.edge_cache[ntype], "u" if ntype == USER else "i"
        missing = sorted({x for x in ids if x not in cache})
        for x in missing:
            cache[x] = []
        for r in store.incident_edges(self.s, ntype, missing) if missing else []:
            cache[r[own]].append(r)
        rows = [r for x in sorted(ids) for r in cache[x]]
        for r in rows:
            e = self.changed.get((r["u"], r["i"]))
            acc = float(r["ig_w"] or 0.0)
            r["on"], r["oo"] = (e["on"], e["oo"]) if e else (acc, acc)
        return rows

    # -- the run -----------------------------------------------------------
    def run(self) -> dict:
        """Propagate layer by layer; return the summary with the writes."""
        self._layer0()
        scratch_edges = {t: self._edges_of(t, self.scratch[t]) for t in (USER, ITEM)}
        touched = {USER: set(), ITEM: set()}
        for layer in range(1, self.L + 1):
            for t, ids in self._layer(layer, scratch_edges).items():
                touched[t] |= ids
        nodes = {t: [{"id": x, "props": self.out[t][x]} for x in sorted(touched[t])] for t in (USER, ITEM)}
        last_in = self.new[self.L - 1]  # nodes whose layer-(L-1) vector moved: their items' side is due
        users = {u for u, _ in self.changed} | set(last_in[USER])
        items = set(last_in[ITEM]) | self.scratch[ITEM]
        writes = {
            "nodes": nodes,
            "edges": [{"e": e["e"], "u": u, "i": i, "w": e["on"], "rev": e["rev"]} for (u, i), e in self.changed.items()],
            "seen": {t: [{"id": r["id"], "at": r["at"]} for r in self.seen[t]] for t in (USER, ITEM)},
            "pending": {USER: [{"id": u, "hs": None if self.sent.get(u) is None else pack(self.sent[u])}
                               for u in sorted(users)],
                        ITEM: [{"id": i, "scratch": i in self.scratch[ITEM]} for i in sorted(items)]},
        }
        return {"changed_edges": len(self.changed), "changed_nodes": sum(map(len, self.scratch.values())),
                "users": len(nodes[USER]), "items": len(nodes[ITEM]),
                "nodes": len(nodes[USER]) + len(nodes[ITEM]),
                "embeddings": sum("embedding" in n["props"] for t in nodes for n in nodes[t]), "writes": writes}

    def _layer0(self) -> None:
        """New input vectors h_0 of changed or never-embedded items."""
        endpoints = {i for _, i in self.changed} | self.scratch[ITEM]
        self._fetch_h(0, ITEM, endpoints)
        meta = {r["id"]: r for r in self.changed_items}
        todo = sorted(set(meta) | {x for x in endpoints if self.old[0][ITEM].get(x) is None})
        if not todo:
            return
        missing = [x for x in todo if x not in meta]
        if missing:  # endpoints never embedded and not flagged: read their features too
            meta.update({r["id"]: r for r in self._item_meta(missing)})
        feats = item_features([meta.get(x, {"id": x}) for x in todo], self.lm.buckets)
        rows = torch.tensor([self.lm.item_rows.get(x, -1) for x in todo], dtype=torch.int64)
        with torch.no_grad():
            h0 = self.lm.model.item_input(rows, **feats).numpy()
        for x, vec in zip(todo, h0):
            if _moved(vec, self.old[0][ITEM].get(x)):
                self.new[0][ITEM][x] = vec
                self.out[ITEM][x][h_key(0)] = pack(vec)

    def _item_meta(self, ids: list[str]) -> list[dict]:
        rows = store.node_state(self.s, ITEM, ids, ["category", "price", "title"])
        return [{"id": x, "category": v[0], "price": v[1], "title": v[2]} for x, v in rows.items()]

    def _layer(self, layer: int, scratch_edges: dict) -> dict[str, set]:
        """Update a_layer by deltas (or from scratch), then recompute h_layer of every target.

        At the last layer only users are computed: items' last layer is the items' side.
        """
        prev, last = layer - 1, layer == self.L
        changed_prev = {t: set(self.new[prev][t]) for t in (USER, ITEM)}
        edges = {(e["u"], e["i"]): e for e in self.changed.values()}
        for t in (ITEM,) if last else (USER, ITEM):  # a user's h_{L-1} reaches only items' last layer
            for r in self._edges_of(t, changed_prev[t]):
                edges.setdefault((r["u"], r["i"]), r)
        targets = {USER: {u for u, _ in self.changed} | changed_prev[USER] | self.scratch[USER],
                   ITEM: {i for _, i in self.changed} | changed_prev[ITEM] | self.scratch[ITEM]}
        for u, i in edges:
            targets[USER].add(u)
            targets[ITEM].add(i)
        if last:  # no item targets, but users' sums need the stored h_{L-1} of these items
            targets[ITEM] = set()
            self._fetch_h(prev, ITEM, {i for _, i in edges})
        self._check_size(targets)
        a, deg = self._start_sums(layer, targets)
        # old h_{l-1} of scratch neighbours outside the targets (edge endpoints are targets)
        if not last:
            self._fetch_h(prev, USER, {e["u"] for e in scratch_edges[ITEM]} - targets[USER])
        self._fetch_h(prev, ITEM, {e["i"] for e in scratch_edges[USER]} - targets[ITEM])
        for (u, i), e in edges.items():
            fresh_u, fresh_i = u in changed_prev[USER], i in changed_prev[ITEM]
            if not (fresh_u or fresh_i or (u, i) in self.changed):
                continue
            on, oo = e["on"], e["oo"]
            if not last and i not in self.scratch[ITEM]:
                if not self._shared_mean(layer, ITEM):
                    a[ITEM][i] += on * self.h(prev, USER, u, True) - oo * self.h(prev, USER, u, False)
                if layer == 1:
                    deg[ITEM][i] += on - oo
            if u not in self.scratch[USER]:
                a[USER][u] += on * self.h(prev, ITEM, i, True) - oo * self.h(prev, ITEM, i, False)
                if layer == 1:
                    deg[USER][u] += on - oo
        for t in (USER,) if last else (USER, ITEM):
            for e in scratch_edges[t]:  # scratch nodes: the sum over current edges
                own, other = (e["u"], e["i"]) if t == USER else (e["i"], e["u"])
                if not self._shared_mean(layer, t):
                    a[t][own] += e["on"] * self.h(prev, OTHER[t], other, True)
                if layer == 1:
                    deg[t][own] += e["on"]
        self._recompute(layer, targets, a, deg)
        return targets

    def _check_size(self, targets: dict) -> None:
        if self.total is None:
            self.total = store.node_count(self.s)
        size = len(targets[USER]) + len(targets[ITEM])
        if size > self.cfg.full_share * max(self.total, 1):
            raise TooLarge(f"affected set {size} > {self.cfg.full_share:.0%} of {self.total} nodes")

    def _shared_mean(self, layer: int, ntype: str) -> bool:
        """Items' layer-1 mean in a deeper model: users share one input, so it is that input (deg > 0)."""
        return layer == 1 and ntype == ITEM and self.L > 1

    def _out_key(self, layer: int) -> str:
        """The stored output a layer's result is compared with: h_layer, or the embedding at the last."""
        return "embedding" if layer == self.L else h_key(layer)

    def _start_sums(self, layer: int, targets: dict):
        """Stored a_layer and deg of the targets (zero for scratch or new nodes); loads their h_{layer-1}
        and, below the last layer, their stored h_layer (for the EPS test).

        One read per node type: each target is looked up once per layer.
        """
        a, deg = {}, {}
        zero, prev = np.zeros_like(self.u0), layer - 1
        self.stored_out = {USER: {}, ITEM: {}}
        for t in (USER, ITEM):
            shared = self._shared_mean(layer, t)
            with_h = prev >= first_h(t) and not shared  # items' h_0 was loaded by `_layer0`
            keys = [DEG] if shared else [DEG, a_key(layer)] + ([h_key(layer)] if layer < self.L else []) + (
                [h_key(prev)] if with_h else [])
            rows = self._state(t, sorted(targets[t]), keys)
            a[t] = defaultdict(lambda z=zero: z.copy())
            deg[t] = defaultdict(float)
            known = self.old[prev][t]
            for x, vals in rows.items():
                v = dict(zip(keys, vals))
                if shared:
                    self.deg_old[x] = float(v[DEG] or 0.0)
                elif layer < self.L:
                    self.stored_out[t][x] = unpack(v[h_key(layer)])
                if with_h and x not in known:
                    known[x] = unpack(v[h_key(prev)])
                if x in self.scratch[t]:
                    continue
                if not shared and v[a_key(layer)] is not None:
                    a[t][x] = unpack(v[a_key(layer)])
                deg[t][x] = float(v[DEG] or 0.0)
            for x in targets[t]:  # deg is final after layer 1: take what that layer computed
                if DEG in self.out[t][x]:
                    deg[t][x] = self.out[t][x][DEG]
        return a, deg

    def _items_layer1(self, ids: list[str], deg: dict) -> None:
        """Items' layer 1 of a deeper model: h_1 = combine(h_0, u0 if deg > 0 else 0).

        So h_1 moves only with h_0 or when deg crosses zero; every other item just gets its new deg,
        without reading or writing a vector (and no layer-1 sum is kept for items).
        """
        todo = []
        for x in ids:
            self.out[ITEM][x][DEG] = float(deg[x])
            if x in self.new[0][ITEM] or x in self.scratch[ITEM] or (self.deg_old.get(x, 0.0) > 0) != (deg[x] > 0):
                todo.append(x)
        if not todo:
            return
        stored = self._state(ITEM, todo, [h_key(1)])
        d = np.array([deg[x] for x in todo])
        mean = np.where(d[:, None] > 0, self.u0[None, :], 0.0)
        h_self = np.stack([self.h(0, ITEM, x, True) for x in todo])
        with torch.no_grad():
            h = self.lm.model.combine(1, ITEM, torch.from_numpy(h_self), torch.from_numpy(mean)).numpy()
        for n, x in enumerate(todo):
            if _moved(h[n], unpack(stored.get(x, [None])[0])):
                self.out[ITEM][x][h_key(1)] = pack(h[n])
                self.new[1][ITEM][x] = h[n]

    def _recompute(self, layer: int, targets: dict, a: dict, deg: dict) -> None:
        """h_layer = combine(h_{layer-1}, a/deg) for every target; the embedding at the last layer."""
        model, prev = self.lm.model, layer - 1
        for t in (USER, ITEM):
            ids = sorted(targets[t])
            if not ids:
                continue
            if self._shared_mean(layer, t):
                self._items_layer1(ids, deg[t])
                continue
            sums = np.stack([a[t][x] for x in ids])
            d = np.array([deg[t][x] for x in ids], dtype=np.float64)
            mean = _mean(sums, d)
            h_self = np.stack([self.h(prev, t, x, True) for x in ids])
            with torch.no_grad():
                h = model.combine(layer, t, torch.from_numpy(h_self), torch.from_numpy(mean))
                emb = model.final(h).numpy() if layer == self.L else None
            h = h.numpy()
            result = h if layer < self.L else emb
            for n, x in enumerate(ids):
                props = self.out[t][x]
                props[a_key(layer)] = pack(sums[n])
                props[DEG] = float(d[n])
                stored = self.stored_out[t].get(x)
                if not _moved(result[n], stored):
                    continue
                props[self._out_key(layer)] = result[n].tolist() if layer == self.L else pack(result[n])
                if layer < self.L:
                    self.new[layer][t][x] = result[n]
                if layer == self.L - 1 and t == USER:
                    self.sent[x] = stored


def _mean(sums: np.ndarray, deg: np.ndarray) -> np.ndarray:
    """Weighted neighbour means, 0 where a node has no weight."""
    return np.where(deg[:, None] > 0, sums / np.where(deg > 0, deg, 1.0)[:, None], 0.0)


def _moved(new: np.ndarray, stored) -> bool:
    """True unless a stored vector exists and the new one is within EPS of it."""
    return stored is None or float(np.max(np.abs(new - stored))) > EPS
