"""Prequential stream evaluation and streaming learning: in memory, through Neo4j, and in production."""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import requests
import torch
from click.testing import CliRunner

from app.cli import main
from app.embeddings import models
from app.embeddings.finetune import fine_tune_and_publish
from app.embeddings.training import model_config
from app.evaluation import events, replay, report
from app.ingest import pipeline
from app.ingest.loaders import Batch
from app.status import status
from graph_models import ModelConfig
from graph_models import stream as prequential
from graph_models.streaming import fold_in
from graph_models.train import build
from tests.conftest import wipe

T0 = datetime(2011, 3, 1, tzinfo=timezone.utc)


def shifting(n_events=3000, users=80, clusters=4, per=20, seed=0, minutes=10):
    """Users buy from one cluster of items, then (from half-way) from the next one; 10% noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_events):
        u = int(rng.integers(users))
        c = (u + (k >= n_events // 2)) % clusters
        if rng.random() < 0.1:
            c = int(rng.integers(clusters))
        rows.append((f"u{u}", f"i{c * per + int(rng.integers(per))}", T0 + timedelta(minutes=minutes * k),
                     int(rng.integers(1, 6))))
    return rows


def small_cfg(**kw):
    return ModelConfig(dim=16, sharp_dim=4, epochs=1, sample_users=200, search_trials=0, **kw)


def test_incremental_beats_static_when_interests_shift_and_files_have_the_documented_shape(tmp_path):
    rows = shifting()
    stream = prequential.encode([r[0] for r in rows], [r[1] for r in rows],
                                [int(r[2].timestamp() * 1000) for r in rows], [float(r[3]) for r in rows])
    result = prequential.evaluate_stream(stream, small_cfg(), train_fraction=0.5, k=10, batch_size=100,
                                         retrain_every=5, finetune_every=5, progress=False)
    m = result["models"]
    assert m["incremental"]["hr"] > 2 * m["static"]["hr"]  # the shift is in the stream, not in training
    assert m["incremental"]["hr"] > m["popularity"]["hr"]
    out = report.write(result, tmp_path)
    saved = json.loads((out / "results.json").read_text())
    assert saved["k"] == 10 and saved["events_scored"] == result["events_scored"] > 500
    assert set(saved["models"]) == set(report.ORDER)
    for scores in saved["models"].values():
        assert set(scores) == {"hr", "ndcg", "mrr", "seconds"}
        assert 0 <= scores["mrr"] <= scores["ndcg"] <= scores["hr"] <= 1 and scores["seconds"] >= 0
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in report.ORDER)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [u["kind"] for u in result["updates"]["streaming"]] == ["fine-tune"] * 3


def trending(n_events=3000, users=80, clusters=4, per=20, hot=3, seed=0, minutes=10):
    """Users buy from their cluster; from half-way, 40% of events are a few hot items new to the shop."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_events):
        u = int(rng.integers(users))
        item = f"i{(u % clusters) * per + int(rng.integers(per))}"
        if k >= n_events // 2 and rng.random() < 0.4:
            item = f"hot{int(rng.integers(hot))}"
        rows.append((f"u{u}", item, T0 + timedelta(minutes=minutes * k), int(rng.integers(1, 6))))
    return rows


def test_streaming_item_biases_follow_what_shoppers_take_up():
    """With item biases, a fine-tune lifts the items shoppers are taking up now, which the version's
    biases (fitted before they existed) cannot: `streaming` ranks them better than `incremental`."""
    rows = trending(per=40)
    stream = prequential.encode([r[0] for r in rows], [r[1] for r in rows],
                                [int(r[2].timestamp() * 1000) for r in rows], [float(r[3]) for r in rows])
    cfg = small_cfg(bias_temperature=0.2, lin_weights="log1p", lin_user_weights="binary", alpha=0.001)
    result = prequential.evaluate_stream(stream, cfg, train_fraction=0.5, k=5, batch_size=100, finetune_every=4,
                                         models=("incremental", "streaming"), progress=False, rounds=0, replay=0)
    m = result["models"]
    assert m["streaming"]["hr"] > 1.2 * m["incremental"]["hr"]
    assert result["protocol"]["model"]["item_bias"] == 0.2
    updates = result["updates"]["streaming"]
    assert updates and any(u["accepted"] for u in updates)


def test_a_live_trend_follows_what_shoppers_take_up_without_a_fine_tune():
    """Hot items new to the shop have no learned bias; the live trend, read from the graph after each
    batch, lifts them for `incremental` too, and `static` keeps the trend it was trained with."""
    rows = trending(per=40)
    stream = prequential.encode([r[0] for r in rows], [r[1] for r in rows],
                                [int(r[2].timestamp() * 1000) for r in rows], [float(r[3]) for r in rows])
    run = dict(train_fraction=0.5, k=5, batch_size=100, finetune_every=4, progress=False, rounds=0, replay=0)
    base = dict(bias_temperature=0.2, lin_weights="log1p", lin_user_weights="binary", alpha=0.001)
    plain = prequential.evaluate_stream(stream, small_cfg(**base), models=("incremental",), **run)["models"]
    trended = prequential.evaluate_stream(stream, small_cfg(**base, trend_halflife=1.0, trend_weight=1.0),
                                          models=("static", "incremental", "streaming"), **run)
    m = trended["models"]
    assert m["incremental"]["hr"] > 1.4 * plain["incremental"]["hr"]
    assert m["incremental"]["hr"] > 1.4 * m["static"]["hr"]
    assert trended["protocol"]["model"]["trend_weight"] == 1.0
    assert trended["updates"]["streaming"]  # the fine-tune runs with the trend too


def test_the_linear_filter_option_reaches_the_stream_models_and_the_default_is_unchanged():
    """`lin_weights`, `lin_user_weights` and `lin_topk` are what the stream's models score with; the
    defaults give the figures of the plain GF-CF filter."""
    from graph_models.spectral import LinearFilter
    rows = shifting(1500)
    stream = prequential.encode([r[0] for r in rows], [r[1] for r in rows],
                                [int(r[2].timestamp() * 1000) for r in rows], [float(r[3]) for r in rows])
    run = dict(train_fraction=0.5, k=10, batch_size=100, models=("static", "incremental"), progress=False)
    plain = prequential.evaluate_stream(stream, small_cfg(), **run)
    default = prequential.evaluate_stream(stream, small_cfg(lin_weights="raw", lin_topk=0), **run)
    assert default["models"]["incremental"]["hr"] == plain["models"]["incremental"]["hr"]
    cfg = small_cfg(alpha=0.01, lin_weights="log1p", lin_user_weights="binary", lin_topk=5)
    tuned = prequential.evaluate_stream(stream, cfg, **run)
    assert {k: tuned["protocol"]["model"][k] for k in ("alpha", "lin_weights", "lin_topk")} == \
        {"alpha": 0.01, "lin_weights": "log1p", "lin_topk": 5}
    assert tuned["models"]["incremental"]["hr"] > tuned["models"]["static"]["hr"]
    start = prequential.start_of_test(stream, 0.5)
    model, _, _ = prequential.train_at(stream, start, cfg)
    inc = prequential.Incremental(model)
    live = prequential.Live(stream, start)
    inc.learn(live, -1)
    lin = inc.scorer.lin
    assert (lin.weights, lin.user_weights, lin.topk) == ("log1p", "binary", 5)
    users = np.arange(5)
    expected = LinearFilter(live.pos, "log1p", 5, "binary")(live.pos[users])
    with torch.no_grad():
        spectral = (inc.scorer.p[torch.as_tensor(users)] @ inc.scorer.q.T).numpy()
    got = np.asarray(inc.score(users, live))
    ranked = np.isfinite(got)  # with a table, only the items the users' rows reach are ranked
    assert np.allclose(got[ranked], (spectral + expected)[ranked], atol=1e-4) and ranked.any()


def test_fold_in_places_a_new_item_next_to_the_items_its_shoppers_have():
    """A new item bought by the shoppers of item j is folded in next to j (its nearest version row)."""
    import scipy.sparse as sp
    rng = np.random.default_rng(1)
    dense = (rng.random((80, 30)) < 0.15).astype(float)
    dense[np.arange(80), np.arange(80) % 30] = 1.0  # every user and item has an edge
    model = build(sp.csr_matrix(dense), ModelConfig(dim=12, sharp_dim=2, svd_iters=8))
    for j in (3, 17):
        live = sp.csr_matrix(np.hstack([dense, dense[:, [j]]]))
        folded = fold_in(model, live)
        v = folded.basis.numpy()
        cos = v[:30] @ v[30] / (np.linalg.norm(v[:30], axis=1) * np.linalg.norm(v[30]))
        assert folded.num_items == 31 and int(np.argmax(cos)) == j and cos[j] > 0.9
        assert np.array_equal(v[:30], model.basis.numpy())  # the version's own rows never move


def test_cli_reads_any_csv_and_refuses_bad_flags(tmp_path, cfg):
    path = tmp_path / "events.csv"
    lines = ["user,item,when,rating"] + [f"{u},{i},{t:%Y-%m-%d %H:%M:%S},{w}" for u, i, t, w in shifting(1200)]
    path.write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    ok = runner.invoke(main, ["evaluate", "stream", "--events", str(path), "--user-col", "user", "--item-col", "item",
                              "--ts-col", "when", "--weight-col", "rating", "--train-fraction", "0.5", "--k", "10",
                              "--batch-minutes", "600", "--models", "popularity,static,incremental",
                              "--out", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved["models"]) == {"popularity", "static", "incremental"}
    assert saved["protocol"]["ingest"]["accepted"] == 1200
    missing = runner.invoke(main, ["evaluate", "stream", "--events", str(path), "--user-col", "user"])
    assert missing.exit_code == 1 and "--ts-col" in missing.output
    wrong = runner.invoke(main, ["evaluate", "stream", "--events", str(path), "--user-col", "user",
                                 "--item-col", "nope", "--ts-col", "when"])
    assert wrong.exit_code == 1 and "'nope'" in wrong.output
    alone = runner.invoke(main, ["evaluate", "stream", "--events", str(path), "--user-col", "user",
                                 "--item-col", "item", "--ts-col", "when", "--trend-weight", "0.2"])
    assert alone.exit_code == 1 and "trend weight needs item biases" in alone.output


def test_a_trend_weight_without_biases_is_refused_at_start(monkeypatch):
    from app.config import load_config
    monkeypatch.setenv("IG_TREND_WEIGHT", "0.2")
    with pytest.raises(ValueError, match="IG_ITEM_BIAS"):
        load_config()
    monkeypatch.setenv("IG_ITEM_BIAS", "0.2")
    monkeypatch.setenv("IG_ITEM_TREND", "3")
    assert load_config().trend_weight == 0.2


def _raw_events(rows, prefix="s", returns_every=23):
    out = []
    for k, (u, i, t, w) in enumerate(rows):
        kind = "return" if k % returns_every == returns_every - 1 else "purchase"
        out.append({"event_id": f"{prefix}{k}", "user_id": u, "item_id": i, "type": kind, "quantity": w,
                    "ts": t.isoformat().replace("+00:00", "Z")})
    return out


def test_in_memory_replay_equals_the_neo4j_path(cfg, clean_db, lease, base_url):
    """The in-memory `incremental` gives the same hits, NDCG and MRR as ingest + refresh + the served
    query, on a stream with returns, new items and new users arriving mid-stream."""
    rows = shifting(600, users=30, clusters=3, per=25, seed=3, minutes=30)
    raw = _raw_events(rows)
    raw += _raw_events([(f"late{k % 5}", f"new{k % 7}", T0 + timedelta(minutes=30 * (400 + 2 * k) + 1),
                         1 + k % 3) for k in range(40)], prefix="late")
    log = events.read(cfg, [Batch(raw, rows=len(raw))], train_fraction=0.6)
    stream = log.stream
    start = prequential.start_of_test(stream, 0.6)
    bounds = prequential.batch_bounds(stream, start, size=40)
    mcfg = model_config(cfg, k=10, epochs=1, sample_users=100)
    model, _, _ = prequential.train_at(stream, start, mcfg)
    memory = prequential.run(stream, start, bounds, [prequential.Incremental(model)], k=10, progress=False)

    def recommend(user_id, k):
        answer = requests.get(f"{base_url}/v1/users/{user_id}/recommendations", params={"k": k}, timeout=30)
        return [r["item_id"] for r in answer.json()["results"]] if answer.ok else []
    # Runs refresh incrementally (not as full recomputes) on this small graph.
    served = replay.run(clean_db, dataclasses.replace(cfg, full_share=0.99), log, start, bounds, model, mcfg,
                        recommend, lease.owner, k=10, progress=False)
    got = memory["models"]["incremental"]
    assert log.counts["accepted"] == 640 and log.counts["duplicates"] == 0
    assert served["events_scored"] == memory["events_scored"] > 60
    assert served["hr"] > 0.03, served
    for key in ("hr", "ndcg", "mrr"):
        assert served[key] == pytest.approx(got[key], abs=1e-12), key


@pytest.fixture
def shifted_service(cfg, clean_db, lease):
    """A graph whose interests shift over 20 days, with a current model trained on all of it."""
    from app.embeddings.training import train_and_publish
    rows = shifting(1500, users=40, clusters=3, per=15, seed=5, minutes=20)
    pipeline.ingest(clean_db, cfg, _raw_events(rows))
    first = train_and_publish(clean_db, cfg, progress=False, owner=lease.owner, train_model=False)
    return first["version"]


def test_fine_tune_refuses_a_worse_version(cfg, clean_db, lease, shifted_service):
    def sabotage(candidate, fit_csr, targets):
        with __import__("torch").no_grad():
            candidate.low.mul_(-1.0)  # the low-pass block turned against the graph: worse on any check
    result = fine_tune_and_publish(clean_db, cfg, lease.owner, tune=sabotage)
    assert result["check"]["accepted"] is False and result["current"] == shifted_service
    assert result["check"]["tuned"]["recall@20"] < result["check"]["current"]["recall@20"]
    assert models.current_info(clean_db, cfg)["version"] == shifted_service
    seen = status(clean_db, cfg)
    assert seen["model"]["version"] == shifted_service
    assert seen["fine_tunes"][0]["version"] == result["version"]
    assert seen["fine_tunes"][0]["fine_tuned_from"] == shifted_service
    assert seen["fine_tunes"][0]["check"]["accepted"] is False and seen["fine_tunes"][0]["current"] is False


def test_fine_tune_not_worse_becomes_current_with_its_lineage(cfg, clean_db, lease, shifted_service):
    result = fine_tune_and_publish(clean_db, cfg, lease.owner, tune=lambda *_: None)  # the same scores
    assert result["check"]["accepted"] is True and result["current"] == result["version"] != shifted_service
    info = models.current_info(clean_db, cfg)
    assert info["version"] == result["version"] and info["fine_tuned_from"] == shifted_service
    assert info["tuned_on"]["recent_targets"] > 0 and info["check"]["users"] > 0
    with clean_db.session(database=cfg.neo4j_database) as s:
        versions = s.run("MATCH (n:User|Item) RETURN collect(DISTINCT n.embedding_version) AS v").single()["v"]
    assert versions == [result["version"]]  # everything re-embedded under the new version


def test_a_version_with_item_biases_is_fine_tuned_on_the_latest_edges(cfg, clean_db, lease):
    """Trained with biases before hot items arrive (nothing is taken up by everyone yet, so training's
    check may leave the biases at zero), a fine-tune (biases only) lifts the hot items, passes its
    check, records it in the lineage, and its biases are what the API serves."""
    from app.embeddings.training import train_and_publish
    rows = trending(1600, users=50, clusters=3, per=40, hot=10, seed=2, minutes=20)
    events = _raw_events(rows)
    pipeline.ingest(clean_db, cfg, events[:800])  # the hot items start with the second half
    biased = dataclasses.replace(cfg, item_bias=0.2, finetune_rounds=0, finetune_replay=3.0)
    first = train_and_publish(clean_db, biased, progress=False, owner=lease.owner, epochs=1)
    lm = models.current(clean_db, cfg)
    assert lm.version == first["version"] and lm.model.biased and lm.mcfg.bias_temperature == 0.2
    assert "hot0" not in lm.item_rows
    pipeline.ingest(clean_db, cfg, events[800:])
    result = fine_tune_and_publish(clean_db, biased, lease.owner)
    assert result["tuned_on"]["rounds"] == 0 and result["tuned_on"]["bias_moved"] > 0
    assert result["check"]["accepted"], result["check"]
    assert result["check"]["tuned"]["recall@20"] > result["check"]["current"]["recall@20"]
    tuned = models.current(clean_db, cfg)
    assert tuned.version == result["version"] and tuned.bias is not None
    assert np.array_equal(tuned.bias[:-1], tuned.model.bias.numpy()) and tuned.bias[-1] == 0
    hot = [tuned.item_rows[f"hot{k}"] for k in range(10)]
    assert tuned.model.bias[hot].median() > tuned.model.bias.median()


def test_admin_queues_a_fine_tune(cfg, clean_db, base_url):
    headers = {"Authorization": f"Bearer {cfg.admin_token}"}
    queued = requests.post(f"{base_url}/admin/finetune", headers=headers, timeout=30)
    assert queued.status_code == 202
    job = requests.get(f"{base_url}/admin/jobs/{queued.json()['job_id']}", headers=headers, timeout=30).json()
    assert job["kind"] == "finetune" and job["state"] == "queued"
    assert requests.post(f"{base_url}/admin/finetune", timeout=30).status_code == 401
    wipe(clean_db, cfg.neo4j_database)  # no worker of a later test should pick the job up
