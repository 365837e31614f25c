"""`train` with IG_CONTENT_MAP on: the version carries its content part, and items it has no row for
get table rows from their metadata (real Neo4j)."""
import dataclasses
import random

import numpy as np

from app.embeddings import models
from app.embeddings.training import train_and_publish
from app.ingest import pipeline, writer
from app.worker import Worker
from tests.conftest import wipe
from tests.test_refresh import SEED_NOW, events

KINDS = ("heart holder", "cake stand", "jumbo bag", "enamel mug")


def test_a_trained_version_embeds_an_item_it_has_no_row_for_from_its_metadata(cfg, driver):
    wipe(driver, cfg.neo4j_database)
    rng = random.Random(3)
    pipeline.ingest(driver, cfg, events(rng, 900, 60, 60, now=SEED_NOW))
    writer.upsert_items(driver, cfg.neo4j_database, [
        {"id": f"i{k}", "props": {"title": f"colour {k} {KINDS[k % 4]}", "category": KINDS[k % 4].split()[-1],
                                  "price": 2.0 * (1 + k % 4)}} for k in range(60)])
    on = dataclasses.replace(cfg, content_map="on", search_trials=3, train_minutes=0.5)
    with Worker(on).holding() as holder:
        result = train_and_publish(driver, on, progress=False, owner=holder.owner)
    assert result["content"]["chosen"]["neighbours"] in (20, 50, 200)
    lm = models.load(result["checkpoint"], result["version"])
    assert lm.model.content is not None and len(lm.model.content.known) > 0
    new = [{"title": "colour 99 cake stand", "category": "stand", "price": 4.0}]
    x, q, _ = lm.content_rows(new)
    assert x.shape == q.shape == (1, lm.model.out_dim) and np.isfinite(q).all() and np.abs(q).sum() > 0
    # the same metadata gives the same rows in every process (a version's rows are deterministic)
    again = models.LoadedModel(lm.version, *_reload(result["checkpoint"]), lm.item_rows)
    assert np.array_equal(again.content_rows(new)[1], q)
    # a version without it gives no rows (such items keep the zero row)
    with Worker(cfg).holding() as holder:
        plain = train_and_publish(driver, cfg, progress=False, owner=holder.owner, train_model=False)
    assert models.load(plain["checkpoint"], plain["version"]).content_rows(new) is None


def _reload(path):
    from graph_models.checkpoint import load_checkpoint
    model, mcfg, meta = load_checkpoint(path)
    return model.double().eval(), mcfg, meta
