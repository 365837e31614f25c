"""The API's in-process copy of the interaction graph, kept current by polling Neo4j, so that a
request reads nothing from Neo4j: the sync that reads what changed as a Delta.

A score is `p_u . q_j + lin(u, j)` (graph_models/model.py). The graph filter `lin` walks u-i-v-j over
the whole neighbourhood: in Cypher that is 10^5-10^6 rows a request. Here it is two sparse products
over a copy of the edges or, for a version served from an item table (past IG_LIN_TABLE_EDGES), the
table rows of the shopper's items, and then only the items they reach are ranked (app/serving/scoring.py).
Each process loads the copy once, in the background, and then moves it by what changed: every
refresh run logs the users and items it recomputed (cypher.APPLIED_LOG), ingest marks what it wrote
as not yet reflected (`ig_unseen`, cypher.SERVING_SYNC), and the copy re-reads just those rows. A
sync runs in the background at most every `poll` seconds while requests come; a request finds the
copy at most that old (plus one sync), or waits up to `wait` for a sync when it is older than
`max_age` (a first request after a quiet spell). The user's vector is summed from the copy's row
of their live edges: exactly what the next refresh run stores, so a shopper's first event
personalises the answers from the next sync on, before any run.

Here a sync reads Neo4j and returns a Delta; `apply(state, delta)` (app/serving/delta.py) builds the
next state without Neo4j and without touching the old one, which is swapped out, so concurrent
requests each score on one consistent state (app/serving/state.py). Rows changed since the last
compaction live in a small overlay over the base matrices, so a sync costs what changed.

For `explain` without an item table, each process also keeps C = R^T D_U^-1 R of the base rows dense
(when the catalogue is small enough for IG_EXPLAIN_TABLE_MB): an answer's parts read its entries
instead of R's rows, and the overlay's change to it is a small product; a compaction folds that in.
"""
from __future__ import annotations

import logging
import threading
import time
from array import array
from dataclasses import replace

import numpy as np

from app import cypher
from app.embeddings import models
from app.errors import NotReady
from app.ids import erasure_key
from app.runtime import freeze_heap, release_heap
from app.serving.delta import Delta, apply
from app.serving.state import Index, Rows, State, built

log = logging.getLogger(__name__)

ERASURE_MARGIN_MS = 120_000  # beyond the longest transaction: an erasure that commits late is still found
# Ingest writes committing this much after their timestamp are still read by the next sync; later
# ones wait for the refresh run that reflects them (a second or so, longer in bursts).
PENDING_MARGIN_MS = 1_000
LOG_RETRIES, LOG_WAIT = 200, 0.005  # how long a background sync waits for committed runs' log entries to show


class Copy:
    """A process's copy of one database's graph: the current State and how to move it.

    `current()` is what a request calls. It reads nothing from Neo4j while the copy's last sync began
    at most `max_age` seconds ago (past `poll` seconds it starts one in the background); an older
    copy waits up to `wait` seconds for a sync that begins after that. `max_age` 0 makes every answer
    reflect Neo4j as of the request (a sync each). The first load runs in the background too: a request
    waits for it up to `start_wait` seconds, then gets NotReady (503) rather than waiting for the whole
    load; `ready()` says whether it has ended.
    """

    def __init__(self, driver, database: str, wait: float = 0.25, poll: float = 0.5, max_age: float = 1.0,
                 table_mb: float = 256, *, secret: str):
        self.driver, self.database, self.secret = driver, database, secret  # secret: IG_ERASURE_SECRET
        self.wait, self.poll, self.max_age = wait, poll, max_age
        self.table_mb = table_mb  # State.table's bound
        self.state: State | None = None
        self.loaded = False  # whether a first load ended (state None then: no model)
        self.start_wait = 1.5
        self.synced = float("-inf")  # monotonic time the current state's sync began
        self.failed = float("-inf")  # monotonic time the last sync failed
        self._load_lock = threading.Lock()
        self._cond = threading.Condition()
        self._syncing = False
        self._sync_began = float("-inf")  # monotonic time the running sync began

    def current(self) -> State | None:
        """The copy for a request (None: no model)."""
        now = time.monotonic()
        if not self.loaded:
            self._await(lambda: self.loaded, self.start_wait)
            if not self.loaded:
                raise NotReady("the serving copy of the graph is loading; send the request again after Retry-After")
            return self.state
        if now - self.synced > self.max_age:
            self._await(lambda: self.synced >= now - self.max_age, self.wait)
        elif now - self.synced > self.poll:
            self._await(lambda: True, 0.0)
        return self.state

    def ready(self) -> str | None:
        """None once the first load has ended, else why requests cannot be answered yet (and a load starts)."""
        if self.loaded:
            return None
        self._await(lambda: self.loaded, 0.0)
        return "the serving copy of the graph is loading"

    def _await(self, done, wait: float) -> None:
        """Run background syncs, one at a time, until `done()`, waiting for them up to `wait` s (0: start one).
        A failed sync ends the wait: the request answers from the copy as it is. So does a sync already
        running longer than `wait` once the copy has loaded (a reload of the whole graph): requests do
        not each wait for it, they answer from the state they have until it ends."""
        began = time.monotonic()
        deadline = began + wait
        with self._cond:
            if self.loaded and self._syncing and began - self._sync_began > wait:
                return
            while True:
                if not self._syncing and (wait == 0 or not done()):
                    self._syncing, self._sync_began = True, time.monotonic()
                    threading.Thread(target=self._sync, daemon=True).start()
                left = deadline - time.monotonic()
                if done() or left <= 0 or self.failed >= began:
                    return
                self._cond.wait(left)

    def _sync(self) -> None:
        """Bring the copy to what Neo4j has now (off the request threads)."""
        try:
            with self._load_lock:
                started = time.monotonic()
                self.state = self._read(self.state)  # None: the graph has no model any more
                self.synced, self.loaded = started, True
        except Exception as exc:  # Neo4j away or the like: requests go on with the copy they have
            self.failed = time.monotonic()
            log.warning("serving copy: sync failed, answering from the copy as it is: %s", exc)
        finally:
            with self._cond:
                self._syncing = False
                self._cond.notify_all()

    def _read(self, st: State | None) -> State | None:
        started = time.monotonic()
        with self.driver.session(database=self.database) as session:
            nxt = session.execute_read(lambda tx: _advance(tx, st, self.table_mb, self.secret))
        if nxt is not None and nxt is not st:
            log.debug("serving copy at run %s (%.3fs)", nxt.seq, time.monotonic() - started)
        return nxt


def _advance(tx, st: State | None, table_mb: float, secret: str) -> State | None:
    """The next state, at the run Neo4j is at now: the logged runs and pending writes since `st` applied,
    or everything read again. `table_mb`: State.table's bound; `secret`: the erasure keys'."""
    if st is None:
        return _load(tx, table_mb)
    delta = read_delta(tx, st, secret)
    if delta is None:
        return _load(tx, table_mb)  # a wiped graph, a full run, or an entry missing
    return apply(st, delta, table_mb)


def read_delta(tx, st: State, secret: str) -> Delta | None:
    """What changed in Neo4j since `st`, as of the run it is at now; None when only reading everything
    again will do (a wiped graph, a full run, or a log entry missing)."""
    sync = tx.run(cypher.SERVING_SYNC, since=st.server_ms - PENDING_MARGIN_MS, seq=st.seq,
                  erased_since=st.server_ms - ERASURE_MARGIN_MS, first=st.lm.mcfg.reads_trend).single()
    seq = sync["head"]
    if st.epoch != sync["epoch"]:
        return None
    # What this window holds, to skip next time: ("e", user, item) -> edge revision, ("i", item) -> item's.
    pending = {("e", u, i): rev for u, i, rev, _, _ in sync["edges"]} | {("i", i): rev for i, rev in sync["items"]}
    patches = {}  # user -> {item: (raw weight, first time)} of the pending edges not read yet
    for u, i, rev, w, first in sync["edges"]:
        if st.pending.get(("e", u, i)) != rev:
            patches.setdefault(u, {})[i] = (w, first)
    changed_items = {i for i, rev in sync["items"] if st.pending.get(("i", i)) != rev}
    entries = _entries(tx, st.seq, seq, sync["applied"])
    if entries is None:
        return None
    users = {u for e in entries for u in e["users"]}
    items = {i for e in entries for i in e["items"]} | changed_items
    erased = {(key, at) for key, at in sync["erased"]}
    fresh = erased - st.erasures
    gone = set()  # ids of the users erased since `st`
    if fresh:
        keys = {key for key, _ in fresh}
        gone = {u for u in set(st.users) | users | set(patches) if erasure_key(secret, u) in keys}
        users |= gone
    last = entries[-1]["seq"] if entries else st.seq
    if last == st.seq and not users and not items and not patches:
        return Delta(st.seq, sync["now"])  # nothing new (another sync got there first, or nothing was written)
    patches = {u: p for u, p in patches.items() if u not in users}  # those rows are read whole
    user_ids = sorted(users)
    rows = {r["u"]: (r["items"], r["w"], r["first"], r["refreshed_at"]) for r in (
        tx.run(cypher.SERVING_USER_EDGES, ids=user_ids, first=st.lm.mcfg.reads_trend) if user_ids else [])}
    delta = Delta(last, sync["now"], rows, user_ids, sorted(items), patches=patches, erasures=frozenset(erased),
                  gone=frozenset(gone), pending=pending)
    read = sorted(set(delta.item_ids) | set(delta.new_items(st.items.index)))
    return replace(delta, items=[dict(x) for x in tx.run(cypher.SERVING_ITEMS_BY_ID, ids=read)] if read else [])


def _entries(tx, seq: int, head: int, entries: list) -> list | None:
    """The serving log's entries after run `seq` up to run `head`, no gap (SERVING_SYNC read `entries`);
    None when they do not show."""
    for _ in range(LOG_RETRIES):
        # A run seen committed (its number on _Refresh) can still be missing from a scan or seek of
        # _Applied for a few milliseconds (measured on Neo4j 5.26: about one sync in four under a 1 s
        # refresh), and for more than 0.1 s while ingest bursts saturate the server (every reload of
        # a 10-minute soak fell in a burst). Wait until every entry up to `head` shows, the last one or
        # one in between, rather than read the whole graph again: requests do not wait for this.
        last = entries[-1]["seq"] if entries else seq
        if head <= last and len(entries) == last - seq:
            break
        time.sleep(LOG_WAIT)
        entries = list(tx.run(cypher.APPLIED_SINCE, seq=seq))
    # Only a run of entries with no gap moves the copy: a missing one (no longer logged, or still not
    # showing after the wait) may have changed rows that no later entry names.
    contiguous = [e["seq"] for e in entries] == list(range(seq + 1, seq + 1 + len(entries)))
    if (head > seq and not entries) or not contiguous or any(e["full"] for e in entries):
        return None  # a full run, or an entry missing
    return entries


def _load(tx, table_mb: float) -> State | None:
    """Everything read again, at the run Neo4j is at now (None without a current model)."""
    head = tx.run(cypher.SERVING_STATE).single()
    now = head["now"]
    info = tx.run(cypher.MODEL_CURRENT).single()
    if info is None:
        return None
    lm = models.load(info["path"], info["version"])
    keys, item_index, refreshed = [], {}, []
    # typed arrays, not lists: a Python float or int per edge would take several times the memory
    ptr, c, w, first = array("q", [0]), array("q"), array("d"), array("d")
    for rec in tx.run(cypher.SERVING_EDGES, first=lm.mcfg.reads_trend):
        keys.append(rec["u"])
        refreshed.append(rec["refreshed_at"])
        c.extend(item_index.setdefault(i, len(item_index)) for i in rec["items"])
        w.extend(rec["w"])
        first.extend(rec["first"])  # empty for a version without a trend
        ptr.append(len(c))
    item_rows = [dict(x) for x in tx.run(cypher.SERVING_ITEMS)]
    rows = Rows(np.array(ptr, dtype=np.int64), np.array(c, dtype=np.int64), np.array(w, dtype=np.float64),
                np.array(first, dtype=np.float64) if first else np.zeros(len(c)))
    del ptr, c, w, first
    st = built(head["epoch"], head["seq"], now, lm, Index(keys), np.asarray(refreshed, dtype=object), rows, item_rows,
               item_index, table_mb)
    release_heap()
    freeze_heap()  # a million ids in the copy's index would otherwise be walked by every full collection
    log.info("serving copy loaded: run %s, %d users, %d items, %d edges", st.seq, st.n_users, st.n_items,
             st.base_csr.nnz)
    return st


_copies: dict[tuple, Copy] = {}
_copies_lock = threading.Lock()


def copy_of(driver, database: str, wait: float = 0.25, poll: float = 0.5, max_age: float = 1.0,
            table_mb: float = 256, *, secret: str, start_wait: float = 1.5) -> Copy:
    """This process's copy of `database` behind `driver` (see Copy for the settings)."""
    key = (id(driver), database, table_mb)  # State.table depends on the bound: apps with another keep their own
    with _copies_lock:
        if key not in _copies:
            _copies[key] = Copy(driver, database, table_mb=table_mb, secret=secret)
        c = _copies[key]
        c.wait, c.poll, c.max_age, c.table_mb, c.secret, c.start_wait = wait, poll, max_age, table_mb, secret, start_wait
        return c
