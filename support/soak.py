"""The exactness soak: every writer at once over real HTTP and real processes, then drain and compare
every stored value with a full recompute of the current model.

`Soak` is the harness: tests/test_soak.py runs one short cycle against the test server's app and a
`worker` subprocess, bench/bench_soak.py runs cycles for minutes against `serve` and `worker`.
"""
from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import requests

from app.embeddings import store
from app.embeddings.training import train_and_publish
from app.ingest import pipeline, writer
from app.worker import Worker
from support import soak_check
from support.graph import wipe
from support.ranking import mismatch, offline_answers
from support.refresh import events
from support.servers import spawn, stop
from support.settings import headers

DAY_MS = 86_400_000
READERS = [f"r{k}" for k in range(4)]   # recommendations are requested for these throughout
ERASABLE = [f"x{k}" for k in range(8)]  # erased now and then, and brought back by later events
# Erased while a full run is under way and brought back at once on some of their items, by nobody else:
# the new node's revisions restart at 1, and no later event would hide what the run left on it.
AGAIN = [f"y{k}" for k in range(4)]
POSITIVE = ["view", "click", "cart", "purchase"]
CLIENTS, BATCH = 3, 12
# Every process of the soak: frequent runs that never fall back to a full recompute (the jobs run
# plenty), small full-run batches (more interleavings with ingest), a lease that survives a loaded
# machine, training capped at one quick pass.
SUBPROCESS_ENV = {"IG_REFRESH_INTERVAL": "0.2", "IG_FULL_SHARE": "10", "IG_LEASE_SECONDS": "4",
                  "IG_FULL_BATCH": "25", "IG_TRAIN_MINUTES": "0.05"}
JOB_BUSY = "MATCH (j:Job) WHERE j.state IN ['queued', 'running'] RETURN count(j) AS n"
USER_ITEMS = "MATCH (:User {id: $id})-->(i:Item) RETURN i.id AS i ORDER BY i"


def seed(driver, cfg, n_events: int = 600, users: int = 60, items: int = 40) -> list[dict]:
    """Wipe, ingest a small graph (the readers with a few purchases each) and train a first model as
    lease holder; return the events, which the edge counts are checked against."""
    wipe(driver, cfg.neo4j_database)
    rng, now = random.Random(7), int(time.time() * 1000)
    batch = events(rng, n_events, users, items, now=now)
    batch += [{"event_id": f"seed-{user}-{k}", "user_id": user, "item_id": f"i{rng.randrange(items)}",
               "type": "purchase", "quantity": 1, "ts": now - k * 60_000} for user in READERS for k in range(6)]
    report = pipeline.ingest(driver, cfg, batch)
    if report.accepted != len(batch):
        raise RuntimeError(f"seed: {report.accepted} of {len(batch)} events accepted: {report}")
    writer.upsert_items(driver, cfg.neo4j_database, [
        {"id": f"i{k}", "props": {"title": f"mug {k % 3}", "category": f"c{k % 4}", "price": 1.0 + k}}
        for k in range(items)])
    with Worker(cfg).holding() as holder:
        train_and_publish(driver, cfg, progress=False, owner=holder.owner, epochs=1)
    return batch


class Soak:
    """Concurrent ingest, item updates, erasures, admin and CLI jobs and a reader against a running API
    and worker; `run` loads, drains and returns what `check` finds."""

    def __init__(self, url: str, driver, cfg, env: dict, logs: Path, seed_events: list[dict],
                 users: int = 60, items: int = 40, seed: int = 1, rankings: bool = False):
        self.url, self.driver, self.cfg, self.env, self.logs = url, driver, cfg, env, logs
        # Drained, the readers' answers equal the offline Scorer's: only where the server's item table
        # (if the version has one) is rebuilt at every sync; else it may lag by its bounded age.
        self.compare_rankings = rankings
        self.users, self.items, self.seed = users, items, seed
        self.admin = {"Authorization": f"Bearer {cfg.admin_token}"}
        self.halt, self.lock, self.local = threading.Event(), threading.Lock(), threading.local()
        self.accepted: set[str] = set()  # every event id that is in the graph by a 2xx answer (and the seed)
        self.counts = defaultdict(Counter)  # (user, item) -> the edge's expected n_<type> and qty
        self.failures: list[str] = []  # every 5xx, transport error, unexpected answer or failed job
        self.answers: list[tuple] = []  # (status, version, item ids) of each recommendation request
        self.runs: dict = {}  # refresh run records seen in /admin/status, by (owner, finished_at, mode)
        self.job_ids: list[str] = []
        self.cli: list[tuple[str, subprocess.Popen, Path]] = []
        self.sent = Counter()
        self._expect(seed_events)
        self.accepted.update(e["event_id"] for e in seed_events)

    # --- plumbing -----------------------------------------------------------
    def _fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)

    def _request(self, method: str, path: str, **kwargs) -> requests.Response | None:
        """One HTTP call; a transport error or a 5xx is recorded as a failure (None returned)."""
        if not hasattr(self.local, "http"):
            self.local.http = requests.Session()
        try:
            token = "IG_PRIVACY_TOKEN" if method == "DELETE" else "IG_SERVICE_TOKEN"
            sent = {**headers(token), **kwargs.pop("headers", {})}
            reply = self.local.http.request(method, self.url + path, timeout=60, headers=sent, **kwargs)
        except requests.RequestException as exc:
            self._fail(f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        if reply.status_code >= 500:
            self._fail(f"{method} {path}: {reply.status_code} {reply.text[:300]}")
            return None
        return reply

    def _expect(self, batch: list[dict]) -> None:
        """Count what accepted events add to their edges (erasable users' edges are not checked)."""
        for e in batch:
            if e["user_id"] in ERASABLE or e["user_id"] in AGAIN:
                continue
            count, qty = self.counts[(e["user_id"], e["item_id"])], e.get("quantity")
            count["n_" + e["type"]] += 1
            count["qty"] += 0 if qty is None else -qty if e["type"] == "return" else qty

    def _user(self, rng: random.Random) -> str:
        return rng.choice(READERS) if rng.random() < 0.1 else f"u{rng.randrange(self.users + 20)}"

    def _item(self, rng: random.Random) -> str:
        return f"i{rng.randrange(self.items + 10)}"  # a few brand-new items too

    # --- load ---------------------------------------------------------------
    def _post(self, batch: list[dict], again: bool = False) -> None:
        """POST a batch until it is answered (a retry is safe: each event id counts once); with `again`,
        send it once more and expect only duplicates."""
        for _ in range(5):
            reply = self._request("POST", "/v1/events", json=batch)
            if reply is None:
                time.sleep(0.5)
                continue
            body = reply.json()
            if (reply.status_code != 200 or body["rejected"] or body["quarantined"]
                    or body["accepted"] + body["duplicates"] != len(batch)):
                self._fail(f"POST /v1/events: {reply.status_code} {json.dumps(body)[:300]}")
                return
            with self.lock:
                self.accepted.update(e["event_id"] for e in batch)
                self._expect(batch)
                self.sent["events"] += len(batch)
                self.sent["batches"] += 1
            break
        else:
            self._fail("POST /v1/events: no answer in 5 tries")
            return
        if again:
            reply = self._request("POST", "/v1/events", json=batch)
            if reply is not None and (reply.status_code != 200 or reply.json()["accepted"] != 0):
                self._fail(f"resent batch: {reply.status_code} {reply.text[:300]}")
            with self.lock:
                self.sent["resent"] += 1

    def _client(self, k: int) -> None:
        """Batches of views, carts and purchases, and purchases cancelled by returns of the same quantity
        and time (in the same batch or the next). Users z<k>-* get only such pairs, from this client
        alone, so their edges' weights come back to exactly 0."""
        rng, n, owed = random.Random(self.seed * 1000 + k), 0, []
        while not self.halt.is_set():
            batch, owed, now = owed, [], int(time.time() * 1000)
            for _ in range(BATCH):
                n += 1
                eid, pick = f"soak{self.seed}-{k}-{n}", rng.random()
                if pick < 0.25:
                    user = f"z{k}-{rng.randrange(3)}" if rng.random() < 0.7 else self._user(rng)
                    buy = {"event_id": eid, "user_id": user, "item_id": self._item(rng), "type": "purchase",
                           "quantity": rng.randint(1, 4), "ts": now - rng.randrange(DAY_MS)}
                    batch.append(buy)
                    (batch if rng.random() < 0.5 else owed).append({**buy, "event_id": eid + "-r", "type": "return"})
                else:
                    user = rng.choice(ERASABLE) if pick < 0.35 else self._user(rng)
                    batch.append({"event_id": eid, "user_id": user, "item_id": self._item(rng),
                                  "type": rng.choice(POSITIVE), "quantity": rng.randint(1, 3),
                                  "ts": now - rng.randrange(7 * DAY_MS)})
            self._post(batch, again=rng.random() < 0.05)
            time.sleep(0.02)
        if owed:  # the returns still owed, so that every pair cancels
            self._post(owed)

    def _item_updates(self) -> None:
        """PUT metadata of a few items (now and then a new item with no edge yet)."""
        rng, n = random.Random(self.seed * 1000 + 101), 0
        while not self.halt.wait(0.2):
            n += 1
            ids = rng.sample(range(self.items + 10), rng.randint(1, 3))
            rows = [{"item_id": f"i{x}", "title": f"mug {rng.randrange(5)}", "category": f"c{rng.randrange(4)}",
                     "price": round(rng.uniform(1, 50), 2)} for x in ids]
            if n % 5 == 0:
                rows.append({"item_id": f"n{self.seed}-{n}", "title": "new", "category": "c9", "price": 1.0})
            reply = self._request("PUT", "/v1/items", json=rows)
            if reply is not None and reply.status_code != 200:
                self._fail(f"PUT /v1/items: {reply.status_code} {reply.text[:300]}")
            self.sent["item_updates"] += 1

    def _erasures(self) -> None:
        """DELETE an erasable user now and then."""
        rng = random.Random(self.seed * 1000 + 102)
        while not self.halt.wait(0.15):
            reply = self._request("DELETE", f"/v1/users/{rng.choice(ERASABLE)}")
            if reply is not None and reply.status_code != 204:
                self._fail(f"DELETE /v1/users: {reply.status_code} {reply.text[:300]}")
            self.sent["erasures"] += 1

    def _recreations(self) -> None:
        """While a full run is pending, erase one of AGAIN and post events of that id at once on some of
        the items it had (one each: revision 1, as the erased edges' often were)."""
        rng, n = random.Random(self.seed * 1000 + 103), 0
        while not self.halt.wait(0.05):
            user = rng.choice(AGAIN)
            with self.driver.session(database=self.cfg.neo4j_database) as s:
                if not store.refresh_state(s)["full_pending"]:
                    continue
                had = [r["i"] for r in s.run(USER_ITEMS, id=user)]
            reply = self._request("DELETE", f"/v1/users/{user}")
            if reply is None or reply.status_code != 204:
                self._fail(f"DELETE /v1/users/{user}: {reply and reply.status_code}")
                continue
            items = rng.sample(had, rng.randint(1, len(had))) if had else [self._item(rng)]
            n, now = n + 1, int(time.time() * 1000) + 1000  # after the erasure, so the events count
            self._post([{"event_id": f"again{self.seed}-{n}-{k}", "user_id": user, "item_id": item,
                         "type": rng.choice(POSITIVE), "quantity": rng.randint(1, 3), "ts": now}
                        for k, item in enumerate(items)])
            with self.lock:
                self.sent["recreated_in_full_runs"] += 1

    def _reader(self) -> None:
        """Recommendations for the readers, over and over; each answer's status, version and items."""
        k = 0
        while not self.halt.is_set():
            user, k = READERS[k % len(READERS)], k + 1
            reply = self._request("GET", f"/v1/users/{user}/recommendations?k=10")
            if reply is None:
                answer = (500, None, [])
            elif reply.status_code == 200 and reply.json()["source"] == "trending":
                answer = ("trending", None, [])  # not embedded (yet): the cold-start answer has no version
            elif reply.status_code == 200:
                body = reply.json()
                answer = (200, body["version"], [r["item_id"] for r in body["results"]])
            else:
                answer = (reply.status_code, None, [])
                if reply.status_code != 404:
                    self._fail(f"GET recommendations: {reply.status_code} {reply.text[:300]}")
            with self.lock:
                self.answers.append(answer)
            time.sleep(0.02)

    def _record_runs(self, status: dict) -> None:
        for r in status["recent_runs"]:
            self.runs[(r.get("owner"), r.get("finished_at"), r["mode"])] = r["mode"]

    def _status_poll(self) -> None:
        """Collect the run records (the status keeps the last 20; at 0.2 s a run, a poll a second misses none)."""
        while not self.halt.wait(1.0):
            reply = self._request("GET", "/admin/status", headers=self.admin)
            if reply is not None and reply.status_code == 200:
                self._record_runs(reply.json())

    # --- writers of embeddings ------------------------------------------------
    def _job(self, path: str, body: dict | None = None) -> None:
        reply = self._request("POST", path, headers=self.admin, json=body)
        if reply is None or reply.status_code != 202:
            self._fail(f"POST {path}: {reply and reply.status_code} {reply and reply.text[:300]}")
            return
        self.job_ids.append(reply.json()["job_id"])

    def _cli(self, *args: str) -> None:
        log = self.logs / f"cli-{len(self.cli)}-{args[0]}.log"
        self.cli.append((" ".join(args), spawn(list(args), self.env, log), log))

    def _job_state(self, job_id: str, deadline: float) -> str:
        while True:
            reply = self._request("GET", f"/admin/jobs/{job_id}", headers=self.admin)
            state = reply.json()["state"] if reply is not None and reply.status_code == 200 else "unknown"
            if state in ("succeeded", "failed") or time.monotonic() > deadline:
                return state
            time.sleep(0.5)

    def _cycle(self, timeout: float) -> None:
        """Every kind of writer of embeddings once, overlapping each other and the load; wait for all."""
        jobs, clis = len(self.job_ids), len(self.cli)
        self._job("/admin/reindex", {"mode": "incremental"})
        self._job("/admin/reindex", {"mode": "full"})
        self._cli("embed", "--full")
        time.sleep(1.0)
        self._cli("train", "--epochs", "1")
        time.sleep(2.0)
        self._job("/admin/retrain")
        time.sleep(1.0)
        self._job("/admin/reindex", {"mode": "full"})
        deadline = time.monotonic() + timeout
        for name, proc, log in self.cli[clis:]:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                self._fail(f"`{name}` still running after {timeout:.0f}s")
                stop(proc)
            if proc.returncode:
                self._fail(f"`{name}` exited {proc.returncode}: {log.read_text()[-500:]}")
        for job_id in self.job_ids[jobs:]:
            state = self._job_state(job_id, deadline)
            if state != "succeeded":
                self._fail(f"job {job_id}: {state}")

    # --- the soak -------------------------------------------------------------
    def run(self, seconds: float = 0.0, gap: float = 0.0, timeout: float = 150.0) -> dict:
        """Load for at least one cycle and `seconds`, with `gap` seconds of ingest only between cycles;
        then drain and check."""
        targets = [(self._client, (k,)) for k in range(CLIENTS)]
        targets += [(self._item_updates, ()), (self._erasures, ()), (self._recreations, ()), (self._reader, ()),
                    (self._status_poll, ())]
        threads = [threading.Thread(target=t, args=a, daemon=True) for t, a in targets]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            while True:
                self._cycle(timeout)
                left = seconds - (time.monotonic() - started)
                if left <= 0:
                    break
                time.sleep(min(gap, left))
            time.sleep(2.0)  # ingest and incremental runs after the last switch of versions
        finally:
            self.halt.set()
            for thread in threads:
                thread.join(timeout=120)
            for _, proc, _ in self.cli:
                stop(proc)
        load_seconds = time.monotonic() - started
        drain_seconds = self._drain(timeout)
        report = self.check(drain_seconds is not None)
        report.update(load_seconds=round(load_seconds, 1), drain_seconds=drain_seconds)
        return report

    def _drain(self, timeout: float) -> float | None:
        """Wait until the worker has applied everything: no lag, no job queued or running, no full run
        pending; the seconds it took, None if it did not within `timeout`."""
        started = time.monotonic()
        while time.monotonic() < started + timeout:
            reply = self._request("GET", "/admin/status", headers=self.admin)
            if reply is not None and reply.status_code == 200:
                status = reply.json()
                self._record_runs(status)
                with self.driver.session(database=self.cfg.neo4j_database) as s:
                    busy = s.run(JOB_BUSY).single()["n"]
                    pending = store.refresh_state(s)["full_pending"]
                if status["lag_seconds"] == 0 and not busy and not pending:
                    return round(time.monotonic() - started, 1)
            time.sleep(0.5)
        return None

    def check(self, drained: bool) -> dict:
        """Everything the soak promises, measured (support/soak_check.py)."""
        return soak_check.report(self, drained, ERASABLE, AGAIN)

    def rankings(self, lm) -> list[str]:
        """Each reader's REST answer against the offline Scorer's ranking on the drained graph: the problems."""
        out = []
        for user, ids, scores in offline_answers(self.driver, self.cfg, lm, 1, 10, users=READERS):
            reply = self._request("GET", f"/v1/users/{user}/recommendations?k=10")
            body = reply.json() if reply is not None and reply.status_code == 200 else {}
            problem = (f"version {body.get('version')}" if body.get("version") != lm.version
                       else mismatch(body["results"], ids, scores))
            if problem:
                out.append(f"{user}: {problem}")
        return out
