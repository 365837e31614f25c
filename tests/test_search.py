"""The settings search: repeatable, refusing what it cannot do, and what it measured is what the API serves."""
from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import requests
import scipy.sparse as sp
import torch

from app.embeddings import models, store
from app.embeddings.training import train_and_publish, weights
from app.ingest import pipeline
from app.worker import Worker
from graph_models import ModelConfig
from graph_models.evaluation import evaluate
from graph_models.search import SearchError, search
from graph_models.split import holdout
from graph_models.train import Scorer, build
from support.recipes import bind, recipe
from tests.conftest import wipe
from tests.test_graph_models import planted

NOW = 1_767_225_600_000  # 2026-01-01


def _split():
    csr, _ = planted(seed=3)
    return holdout(csr, 0.2, 0)


def test_the_search_is_repeatable_given_its_seed():
    """Two searches with one seed try the same settings in the same order and choose the same."""
    fit_csr, val = _split()
    cfg = ModelConfig(dim=16, sharp_dim=4, search_trials=14, k=10, seed=5)
    one, a = search(fit_csr, val, cfg, progress=False)
    two, b = search(fit_csr, val, cfg, progress=False)
    assert one == two and a["chosen"] == b["chosen"]
    assert [r["recall@10"] for r in a["trials"]] == [r["recall@10"] for r in b["trials"]]
    assert len(a["trials"]) == 14
    # the known-good starting points come first: GF-CF's settings are trial 0
    assert a["trials"][0]["trial"] == 0 and a["validation"]["recall@10"] == max(r["recall@10"] for r in a["trials"])


def test_what_the_search_measured_is_what_the_built_model_scores():
    """The chosen settings, built into a model, rank the validation users as the search measured."""
    fit_csr, val = _split()
    cfg = ModelConfig(dim=16, sharp_dim=4, search_trials=20, k=10)
    chosen, found = search(fit_csr, val, cfg, progress=False)
    model = build(fit_csr, chosen)
    got = evaluate(Scorer(model, fit_csr), val, fit_csr, 10)
    assert got["recall@10"] == pytest.approx(found["validation"]["recall@10"], abs=2e-3)
    assert got["ndcg@10"] == pytest.approx(found["validation"]["ndcg@10"], abs=2e-3)


def test_fixed_settings_are_not_searched():
    fit_csr, val = _split()
    cfg = ModelConfig(dim=16, sharp_dim=4, search_trials=8, k=10)
    chosen, found = search(fit_csr, val, cfg, fixed={"lin_beta": 0.4, "rank": 8}, progress=False)
    assert chosen.lin_beta == 0.4 and chosen.rank == 8 and found["fixed"] == ["lin_beta", "rank"]


def test_an_empty_validation_split_or_no_time_is_a_clear_error():
    fit_csr, val = _split()
    cfg = ModelConfig(dim=16, sharp_dim=4, search_trials=5, k=10)
    with pytest.raises(SearchError, match="no users with held-out interactions"):
        search(fit_csr, {}, cfg, progress=False)
    with pytest.raises(SearchError, match="budget"):
        search(fit_csr, val, cfg, budget_s=0.0, progress=False)


def _paired_shop(pairs=30, users=400, seed=0):
    """Items in pairs (2k, 2k+1) alike in content: a shopper of one buys the other later (the validation
    item), and only a quarter of the shoppers have both in the fit graph, so the edges say little of it."""
    rng = np.random.default_rng(seed)
    rows, cols, val = [], [], {}
    for u in range(users):
        k = int(rng.integers(pairs))
        first, second = (2 * k, 2 * k + 1) if rng.random() < 0.5 else (2 * k + 1, 2 * k)
        picks = [first] + [int(o) for o in rng.choice(2 * pairs, 3, replace=False) if o // 2 != k]
        if rng.random() < 0.25:
            picks.append(second)
        else:
            val[u] = {second}
        rows += [u] * len(picks)
        cols += picks
    fit_csr = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(users, 2 * pairs))
    feats = np.repeat(np.eye(pairs), 2, axis=0) + 0.3 * rng.random((2 * pairs, pairs))
    return fit_csr, val, feats


EASE_ONLY = {"lin_weight": 0.0, "alpha": 1e-3, "sharp_alpha": 0.0, "ease_weight": 1.0, "ease_lambda": 30.0}


def test_the_items_content_in_ease_is_chosen_where_it_predicts_what_is_bought_together():
    """With the items' feature rows, the search weighs them in EASE's Gram, ranks the validation items
    far better than EASE on the edges alone, and the built model scores what the search measured."""
    fit_csr, val, feats = _paired_shop()
    cfg = ModelConfig(dim=8, sharp_dim=2, search_trials=4, k=10)
    plain, a = search(fit_csr, val, cfg, EASE_ONLY, progress=False)
    chosen, b = search(fit_csr, val, cfg, EASE_ONLY, progress=False, content=feats)
    assert plain.ease_content == 0.0 and chosen.ease_content > 0.0
    assert b["validation"]["recall@10"] > a["validation"]["recall@10"] + 0.2
    got = evaluate(Scorer(build(fit_csr, chosen, content=feats), fit_csr), val, fit_csr, 10)
    assert got["recall@10"] == pytest.approx(b["validation"]["recall@10"], abs=2e-3)
    with pytest.raises(ValueError, match="content"):
        build(fit_csr, chosen)


def test_content_weighed_at_zero_leaves_ease_as_it_was_and_items_without_edges_out():
    fit_csr, _, feats = _paired_shop()
    cfg = ModelConfig(dim=8, sharp_dim=2, ease_weight=1.0, ease_lambda=30.0)
    plain = build(fit_csr, cfg).ease
    assert torch.equal(build(fit_csr, cfg, content=feats).ease, plain)
    weighed = build(fit_csr, replace(cfg, ease_content=10.0), content=feats).ease
    assert not torch.equal(weighed, plain)
    # an item nobody bought keeps EASE's zero column: the content map's mix scores it, not EASE too
    unbought = sp.csr_matrix(fit_csr.multiply(np.arange(fit_csr.shape[1]) != 7))
    unbought.eliminate_zeros()
    assert not build(unbought, replace(cfg, ease_content=10.0), content=feats).ease[:, 7].any()


def _events(n, seed=21):
    rng = random.Random(seed)
    return [{"event_id": f"q{k}", "user_id": f"u{rng.randrange(50)}", "item_id": f"i{rng.randrange(30)}",
             "type": rng.choice(["view", "cart", "purchase"]), "quantity": rng.randint(1, 3),
             "ts": NOW - rng.randrange(30 * 86_400_000)} for k in range(n)]


def _offline(cfg, driver, lm):
    """Every user's offline Scorer scores under the current version (ids in snapshot order)."""
    with driver.session(database=cfg.neo4j_database) as s:
        snap = s.execute_read(lambda tx: store.export(tx))
    graph = weights(snap, lm.meta)
    return snap, graph, Scorer(lm.model, graph)(list(range(len(snap.user_ids)))).numpy().astype(np.float64)


def _assert_served_equals_offline(cfg, driver, base_url, lm):
    snap, graph, scores = _offline(cfg, driver, lm)
    ids = [it["id"] for it in snap.items]
    for row, user in list(enumerate(snap.user_ids))[::5]:
        s = scores[row].copy()
        s[graph[row].indices] = -np.inf
        s[[k for k, it in enumerate(snap.items) if it["id"] not in lm.item_rows]] = -np.inf
        top = np.argsort(-s, kind="stable")[:5]
        answer = requests.get(f"{base_url}/v1/users/{user}/recommendations", params={"k": 5, "explain": "true"},
                              timeout=30).json()
        assert answer["version"] == lm.version
        got = answer["results"]
        assert [r["item_id"] for r in got] == [ids[j] for j in top] or \
            np.allclose([r["score"] for r in got], s[top], rtol=1e-4), (got, [ids[j] for j in top])
        assert np.allclose([r["score"] for r in got], s[top], rtol=1e-4, atol=1e-6)
        for r in got:  # explain's parts add up to the score with every term of the chosen settings
            size = sum(abs(p["contribution"]) for p in r["because"])
            if len(r["because"]) == len(graph[row].indices):
                assert sum(p["contribution"] for p in r["because"]) == pytest.approx(r["score"], abs=1e-5 * size)


def test_a_version_with_every_term_serves_its_offline_ranking(cfg, driver, base_url):
    """EASE, a target degree exponent other than GF-CF's, log1p/binary weights and a raw low-rank block:
    the API's answers (and explain's parts) are the offline Scorer's."""
    wipe(driver, cfg.neo4j_database)
    pipeline.ingest(driver, cfg, _events(500))
    with Worker(cfg).holding() as holder:
        train_and_publish(driver, cfg, progress=False, owner=holder.owner, train_model=False, rank=16,
                          ease_lambda=20.0, ease_weight=0.7, lin_beta=0.35, lin_weights="log1p",
                          lin_user_weights="binary", sharp_alpha=0.2, alpha=0.5)
    lm = models.current(driver, cfg)
    assert lm.model.eased and lm.mcfg.lin_beta == 0.35 and lm.ease.shape == (31, 31)
    _assert_served_equals_offline(cfg, driver, base_url, lm)
    # docs/cypher.md: the recipe ranks by GF-CF's form of the same stored vectors, not the served terms
    params, query = recipe("Recommendations for a shopper")
    gfcf = copy.deepcopy(lm.model)
    gfcf.cfg = replace(lm.mcfg, lin_weights="raw", lin_user_weights=None, lin_beta=0.5, lin_weight=1.0,
                       ease_weight=0.0)
    snap, graph, _ = _offline(cfg, driver, lm)
    form = Scorer(gfcf, graph)(list(range(len(snap.user_ids)))).numpy()
    differs = 0
    for row, user in list(enumerate(snap.user_ids))[::7]:
        with driver.session(database=cfg.neo4j_database) as s:
            rows = s.run(query, **{**bind(s, params), "user_id": user, "k": 5}).data()
        s_row = form[row].copy()
        s_row[graph[row].indices] = -np.inf
        assert [r["score"] for r in rows] == pytest.approx(np.sort(s_row)[::-1][:5].tolist(), rel=1e-4)
        api = requests.get(f"{base_url}/v1/users/{user}/recommendations", params={"k": 5}, timeout=30).json()
        differs += [r["item_id"] for r in rows] != [r["item_id"] for r in api["results"]]
    assert differs  # the served ranking is not the recipe's


def test_a_version_served_from_an_item_table_serves_its_offline_ranking(cfg, driver, base_url):
    """The filter held as each item's 3 nearest items (with a target exponent and log1p/binary weights):
    the API ranks the candidates the rows reach as the offline Scorer does, and explain's parts (the
    table's entries) add up to the score."""
    wipe(driver, cfg.neo4j_database)
    pipeline.ingest(driver, cfg, _events(500))
    with Worker(cfg).holding() as holder:
        train_and_publish(driver, cfg, progress=False, owner=holder.owner, train_model=False, rank=16,
                          lin_topk=3, k=5, lin_beta=0.35, lin_weights="log1p", lin_user_weights="binary",
                          sharp_alpha=0.2, alpha=0.5)
    lm = models.current(driver, cfg)
    assert lm.mcfg.lin_topk == 3 and not lm.model.eased
    _, _, scores = _offline(cfg, driver, lm)
    assert np.isinf(scores).any()  # some items are no user's candidates
    _assert_served_equals_offline(cfg, driver, base_url, lm)
    # a batch's work bound counts each user's items x the row length, not the graph's edges
    from app.serving import graph as serving
    st = serving.Copy(driver, cfg.neo4j_database, secret=cfg.erasure_secret).current()
    assert st.work(["u1", "u2"]) == 3 * (len(st.row("u1")[0]) + len(st.row("u2")[0])) < st.base_csr.nnz
    # docs/cypher.md: in GF-CF's form, the recipe's filter is the exact one, so it scores an item the API
    # ranks at least as high as the API does, and higher where the table dropped a path
    with Worker(cfg).holding() as holder:
        train_and_publish(driver, cfg, progress=False, owner=holder.owner, train_model=False, lin_topk=3, k=5)
    params, query = recipe("Recommendations for a shopper")
    higher = 0
    for user in [f"u{n}" for n in range(0, 50, 7)]:
        api = requests.get(f"{base_url}/v1/users/{user}/recommendations", params={"k": 5}, timeout=30).json()
        with driver.session(database=cfg.neo4j_database) as s:
            exact = {r["item_id"]: r["score"] for r in s.run(query, **{**bind(s, params), "user_id": user, "k": 30})}
        for r in api["results"]:
            assert exact[r["item_id"]] >= r["score"] - 1e-4 * abs(r["score"])
            higher += exact[r["item_id"]] > r["score"] + 1e-4 * abs(r["score"])
    assert higher


def test_train_chooses_records_and_serves_its_settings(cfg, driver, base_url):
    """`train` with the search on: the chosen settings are the version's config, the search (settings and
    each trial's validation figures) is on (:Model) and in TensorBoard, and the API serves that ranking."""
    wipe(driver, cfg.neo4j_database)
    pipeline.ingest(driver, cfg, _events(900, seed=4))
    with Worker(cfg).holding() as holder:
        result = train_and_publish(driver, cfg, progress=False, owner=holder.owner, search_trials=8)
    lm = models.current(driver, cfg)
    assert lm.version == result["version"]
    with driver.session(database=cfg.neo4j_database) as s:
        row = s.run("MATCH (m:Model {version: $v}) RETURN m.search AS search, m.config AS config",
                    v=lm.version).single()
    found, config = json.loads(row["search"]), json.loads(row["config"])
    assert len(found["trials"]) == 8 and all("recall@20" in t for t in found["trials"])
    for key, value in found["chosen"].items():
        assert config[key] == pytest.approx(value) if isinstance(value, float) else config[key] == value
    assert result["settings"]["rank"] == config["rank"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(result["runs"]))
    _assert_served_equals_offline(cfg, driver, base_url, lm)


def test_an_impossible_budget_fails_and_the_previous_model_stays_current(cfg, driver):
    """A budget that cannot fit one trial is refused with a clear error; the version in use stays."""
    wipe(driver, cfg.neo4j_database)
    pipeline.ingest(driver, cfg, _events(300, seed=8))
    with Worker(cfg).holding() as holder:
        before = train_and_publish(driver, cfg, progress=False, owner=holder.owner, train_model=False)
        with pytest.raises(SearchError, match="budget"):
            train_and_publish(driver, replace(cfg, train_minutes=1e-9), progress=False, owner=holder.owner,
                              search_trials=5)
    assert models.current(driver, cfg).version == before["version"]
    # one item per shopper: nothing to hold out, so nothing to choose on
    pipeline.ingest(driver, cfg, [{"event_id": f"one{k}", "user_id": f"solo{k}", "item_id": f"i{k % 30}",
                                   "type": "view", "ts": NOW} for k in range(40)])
    with driver.session(database=cfg.neo4j_database) as s:
        s.run("MATCH (u:User) WHERE NOT u.id STARTS WITH 'solo' DETACH DELETE u").consume()
    with Worker(cfg).holding() as holder, pytest.raises(SearchError, match="no users with held-out"):
        train_and_publish(driver, cfg, progress=False, owner=holder.owner, search_trials=5)
    assert models.current(driver, cfg).version == before["version"]
    env = {**os.environ, "IG_TRAIN_MINUTES": "0"}
    done = subprocess.run([sys.executable, "-m", "app", "train"], capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "IG_TRAIN_MINUTES must be a positive number" in done.stderr
    assert models.current(driver, cfg).version == before["version"]


def test_evaluate_log_reports_ours_and_the_tuned_baselines_on_any_csv(tmp_path):
    """`evaluate log` on a CSV with `load csv`'s column flags: one table, ours and every baseline; a
    missing column flag is a clear error."""
    rng = random.Random(2)
    lines = ["who,what,when"] + [f"u{rng.randrange(60)},i{rng.randrange(12) + 12 * (k % 3)},{1_700_000_000 + k * 60}"
                                 for k in range(1500)]
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "IG_SEARCH_TRIALS": "6"}
    args = [sys.executable, "-m", "app", "evaluate", "log", "--events", str(path), "--user-col", "who",
            "--item-col", "what"]
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "--ts-col" in done.stderr
    out = tmp_path / "report.json"
    done = subprocess.run([*args, "--ts-col", "when", "--out", str(out)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    for key in ("ours", "ease", "itemknn", "gfcf", "popularity"):
        assert 0 <= report[key]["recall@20"] <= 1 and f"\n{key}" in done.stdout
    assert report["ours"]["settings"]["rank"] and report["split"]["test_users"] > 0
