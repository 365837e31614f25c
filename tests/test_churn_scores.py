"""Stored churn scores on a real Neo4j: the job scores from the graph's history, the API reads the index."""
import json
from datetime import datetime, timezone

import numpy as np
import pytest
import requests

from app import churn, cypher, jobs
from app.embeddings.store import LeaseLost
from app.serving import churntop
from app.ingest import pipeline, writer
from app.worker import Worker
from bench.bench_ingest import wipe

DAY_MS = 86_400_000
START = int(datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)


def _variant(cfg, **changes):
    return type(cfg)(**{**cfg.__dict__, **changes})


def shoppers(first_day: int, last_day: int, seed: int, users: int = 80) -> list[dict]:
    """Purchases of users each at their own pace until their own last day (some never stop), and of
    `steady`, who buys every three days, in [first_day, last_day)."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(users):
        gap = rng.uniform(2, 8)
        stop = rng.uniform(20, 150) if u % 3 else 10_000
        day = rng.uniform(0, 10) if first_day == 0 else first_day + rng.uniform(0, gap)
        while day < min(stop, last_day):
            if day >= first_day:
                out.append((f"u{u}", day))
            day += rng.exponential(gap)
    out += [("steady", float(d)) for d in range(first_day, last_day, 3)]
    return [{"event_id": f"e{seed}-{n}", "user_id": u, "item_id": f"i{n % 25}", "type": "purchase", "quantity": 1,
             "ts": START + int(day * DAY_MS)} for n, (u, day) in enumerate(out)]


def stored(driver, cfg) -> dict:
    with driver.session(database=cfg.neo4j_database) as s:
        rows = s.run("MATCH (u:User) WHERE u.churn_score IS NOT NULL "
                     "RETURN u.id AS id, u.churn_score AS score, u.churn_reasons AS reasons").data()
    return {r["id"]: (r["score"], json.loads(r["reasons"])) for r in rows}


@pytest.fixture(scope="module")
def scored_graph(cfg, driver):
    """120 days of purchases, scored once by the churn job (14-day horizon); wiped afterwards. The tests
    run in file order: the last one adds a month."""
    wipe(driver, cfg.neo4j_database)
    small = _variant(cfg, churn_horizon_days=14)
    pipeline.ingest(driver, small, shoppers(0, 120, seed=1))
    with Worker(small).holding() as holder:
        first = churn.run(driver, small, holder.owner)
    yield small, first
    wipe(driver, cfg.neo4j_database)


def test_the_job_scores_and_the_api_reads_the_stored_top_k(scored_graph, driver, serve):
    small, first = scored_graph
    assert first["promote"] and first["version"] == first["candidate"] and first["scored"] > 50
    scores = stored(driver, small)
    assert len(scores) == first["scored"]
    assert all(0 <= s <= 1 and 1 <= len(r) <= 3 for s, r in scores.values())
    url = serve(small)
    answer = requests.get(f"{url}/v1/users/churn-risk", params={"k": 10, "min_events": 2}, timeout=60).json()
    top = sorted(scores.items(), key=lambda kv: -kv[1][0])[:10]
    assert [r["score"] for r in answer["results"]] == [s for _, (s, _) in top]
    for row in answer["results"]:
        assert row["score"] == scores[row["user_id"]][0]
        assert row["reasons"]["contributions"] == scores[row["user_id"]][1]
        assert row["reasons"]["version"] == first["version"] and row["silent_days"] >= 0


def test_the_top_k_is_an_index_read(scored_graph, driver):
    small, _ = scored_graph
    with driver.session(database=small.neo4j_database) as s:
        plan = s.run("EXPLAIN " + cypher.CHURN_TOP, k=10, min_days=2).consume().plan
    text = json.dumps(plan)
    assert "NodeIndexSeekByRange" in text and "AllNodesScan" not in text and "Expand" not in text


def test_the_history_read_page_by_page_is_the_whole_history(scored_graph, driver):
    small, _ = scored_graph
    with driver.session(database=small.neo4j_database) as s:
        whole, paged = churn.history(s), churn.history(s, page=7)
        edges = s.run("MATCH (:User)-[r:INTERACTED]->() RETURN count(r) AS n").single()["n"]
    key = ["user", "item", "ts"]
    assert len(whole) >= edges and whole.sort_values(key, ignore_index=True).equals(paged.sort_values(key, ignore_index=True))


def test_a_writer_without_the_lease_writes_nothing(scored_graph, driver):
    """Another worker holds the lease: the job of one that does not (or lost it) fails before any write."""
    small, _ = scored_graph

    def written():
        with driver.session(database=small.neo4j_database) as s:
            return (s.run("MATCH (m:ChurnModel) RETURN count(m) AS n").single()["n"], stored(driver, small))
    before = written()
    with Worker(small).holding():
        for owner in ("a-worker-without-the-lease", None):
            with pytest.raises(LeaseLost):
                churn.run(driver, small, owner)
    assert written() == before


def test_the_job_keeps_the_current_model_when_the_candidate_is_worse(scored_graph, driver):
    """A tolerance of -1 asks a candidate to beat the current model by a whole unit of AUC: refused,
    recorded, and the scores still come from the current version."""
    small, first = scored_graph
    with Worker(small).holding() as holder:
        refused = churn.run(driver, _variant(small, churn_tolerance=-1.0), holder.owner)
    assert not refused["promote"] and refused["version"] == first["version"] != refused["candidate"]
    assert refused["current_auc"] is not None
    with driver.session(database=small.neo4j_database) as s:
        rows = s.run("MATCH (m:ChurnModel) RETURN m.version AS v, m.current AS current, m.promoted AS promoted").data()
        versions = {r["version"] for r in s.run("MATCH (u:User) WHERE u.churn_score IS NOT NULL "
                                                "RETURN DISTINCT u.churn_version AS version")}
    assert {r["v"]: (bool(r["current"]), r["promoted"]) for r in rows} == {
        first["version"]: (True, True), refused["candidate"]: (False, False)}
    assert versions == {first["version"]}


def api_top(url, k=1000) -> list[tuple]:
    """(user, score, contributions, the scoring run's time) of the API's churn list."""
    answer = requests.get(f"{url}/v1/users/churn-risk", params={"k": k, "min_events": 2}, timeout=60)
    assert answer.status_code == 200, answer.text
    return [(r["user_id"], r["score"], r["reasons"]["contributions"], r["reasons"]["scored_at"])
            for r in answer.json()["results"]]


def stored_top(driver, cfg) -> list[tuple]:
    """The same, from the stored scores (ties in the index's order, as the API reads them)."""
    with driver.session(database=cfg.neo4j_database) as s:
        rows = s.run(cypher.CHURN_TOP, k=1000, min_days=2).data()
    return [(r["user_id"], r["score"], json.loads(r["reasons"]), r["scored_at"]) for r in rows]


def test_a_user_who_stops_buying_rises_in_risk_after_the_next_run(scored_graph, driver, serve):
    """...and the API, which keeps the run's top list, serves the new run once it checks the stamp."""
    small, first = scored_graph
    before = stored(driver, small)["steady"][0]
    churntop.forget()  # as a process started now: the earlier tests' apps kept an earlier run's list
    kept = serve(_variant(small, churn_check=3600.0))  # checks the stamp once an hour
    old = stored_top(driver, small)
    assert api_top(kept) == old and len(old) == first["scored"]
    later = [e for e in shoppers(120, 150, seed=2) if e["user_id"] != "steady"]  # everyone else goes on
    pipeline.ingest(driver, small, later)
    with Worker(small).holding() as holder:
        second = churn.run(driver, small, holder.owner)
    after = stored(driver, small)["steady"][0]
    assert after > before + 0.2, (before, after, second)
    with driver.session(database=small.neo4j_database) as s:
        versions = s.run("MATCH (m:ChurnModel) RETURN m.version AS v, m.current AS current").data()
    assert len(versions) == 3 and sum(bool(v["current"]) for v in versions) == 1
    now = stored_top(driver, small)
    assert api_top(kept) == old and old[0][3] != now[0][3]  # kept: the next check is an hour away
    checking = serve(_variant(small, churn_check=0.0))  # checks on every request
    assert api_top(checking) == now and ("steady", after) in [r[:2] for r in now]
    assert api_top(kept) == now  # one list a process: the other app's check renewed it
    assert [r[0] for r in api_top(checking, k=7)] == [r[0] for r in now[:7]]


def test_an_erased_user_leaves_the_kept_list(scored_graph, driver, serve):
    small, _ = scored_graph
    url = serve(_variant(small, churn_check=0.0))
    gone = api_top(url)[0][0]
    writer.delete_user(driver, small.neo4j_database, gone, secret=small.erasure_secret)
    assert gone not in [r[0] for r in api_top(url)] and api_top(url) == stored_top(driver, small)


def test_the_worker_runs_a_queued_churn_job(scored_graph, driver, lease):
    """The scheduled job's path: queued, claimed by the lease holder, run, its result on the job (at the
    default 90-day horizon this 150-day graph has too little history before its validation cut)."""
    small, _ = scored_graph
    with driver.session(database=small.neo4j_database) as s:
        job = jobs.create(s, "churn", {"reason": "test"})
    lease.tick()
    with driver.session(database=small.neo4j_database) as s:
        done = jobs.get(s, job["id"])
    result = done["result"] if isinstance(done["result"], dict) else json.loads(done["result"])
    assert done["state"] == "succeeded" and "history before the validation cut" in result["skipped"]


def test_the_kept_lists_stay_bounded(scored_graph, driver, serve):
    """min_events is the caller's: past churntop.KEYS values the least recently checked list goes."""
    small, _ = scored_graph
    url = serve(_variant(small, churn_check=3600.0))
    for days in range(2, 2 + churntop.KEYS + 5):
        assert requests.get(f"{url}/v1/users/churn-risk", params={"k": 5, "min_events": days}, timeout=60).ok
    assert len(churntop._kept) <= churntop.KEYS
