"""Real Chromium (Debian's package, driven by Playwright): Neo4j Browser runs the docs' recipe, /ui renders.

One browser for the module and one small trained graph; screenshots go to var/test-output/.
"""
from __future__ import annotations

import dataclasses
import random
import re
import shutil
import time
import uuid

import pytest
import requests

from app.config import ROOT
from app.embeddings import models
from app.embeddings.refresh import refresh
from app.embeddings.training import train_and_publish
from app.ingest import pipeline, writer
from app.worker import Worker
from support.recipes import BLOCK, DOC, PARAM, bind
from tests.conftest import SERVICE, wipe

CHROMIUM = "/usr/bin/chromium"
OUTPUT = ROOT / "var" / "test-output"
SHOPPER = "shopper-1"
TITLES = ["enamel mug", "reading lamp with a long brass arm", "wool scarf", "glass vase"]  # long and short labels


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (the Makefile's `browser` step installs the package)."""
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing and could not be installed here (`apt-get install -y chromium` "
                    "as root; `make test` does it): browser tests skipped")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the `test` extra")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: the suite may run as root, where Chromium's sandbox refuses to start.
        chrome = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chrome
        chrome.close()


@pytest.fixture(scope="module")
def shop(cfg, driver):
    """A small shop (60 titled items in four categories), trained and embedded; returns the model version."""
    wipe(driver, cfg.neo4j_database)
    rng = random.Random(15)
    now = int(time.time() * 1000)
    events = [{"event_id": f"b{n}", "user_id": f"shopper-{rng.randrange(40)}", "item_id": f"sku-{rng.randrange(60)}",
               "type": rng.choice(["view", "cart", "purchase"]), "ts": now - rng.randrange(20 * 86_400_000)}
              for n in range(500)]
    pipeline.ingest(driver, cfg, events)
    writer.upsert_items(driver, cfg.neo4j_database, [
        {"id": f"sku-{k}", "props": {"title": f"{TITLES[k % 4]} no. {k} in {['white', 'red', 'blue'][k % 3]}",
                                     "category": ["kitchen", "lighting", "fashion", "decor"][k % 4],
                                     "price": 2.0 + k}} for k in range(60)])
    with Worker(cfg).holding() as holder:
        version = train_and_publish(driver, cfg, progress=False, owner=holder.owner, epochs=1)["version"]
        lm = models.current(driver, cfg)
        for step in range(3):  # three refreshes that move the shopper's interest: a drift history
            pipeline.ingest(driver, cfg, [{"event_id": f"move{step}-{k}", "user_id": SHOPPER, "item_id": f"sku-{4 * k + step}",
                                           "type": "purchase", "ts": now - k} for k in range(3)])
            refresh(driver, cfg, lm, owner=holder.owner)
    return version


def recommendation_block(user_id: str) -> str:
    """The docs' recommendation recipe exactly as written (`:param` lines, then the query), for `user_id`."""
    text = DOC.read_text()
    for match in BLOCK.finditer(text):
        if re.search("recommend", re.findall(r"^## (.+)$", text[:match.start()], re.M)[-1], re.I):
            return re.sub(r"(:param user_id\s*=>\s*)'[^']*'", rf"\1'{user_id}'", match.group(1).strip())
    raise AssertionError(f"no recommendation recipe in {DOC}")


def test_neo4j_browser_runs_the_recommendation_recipe(cfg, driver, shop, browser):
    """Log into the real Neo4j Browser, run the recipe, see the rows the driver gets for it."""
    block = recommendation_block(SHOPPER)
    params = [PARAM.match(line).groups() for line in block.splitlines() if line.startswith(":param")]
    query = "\n".join(line for line in block.splitlines() if not line.startswith(":"))
    with driver.session(database=cfg.neo4j_database) as s:
        expected = [r.values() for r in s.run(query, **bind(s, params))]
    assert expected, "the recipe returns rows for the test shopper"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    local = ("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")
    outside = []
    page.on("request", lambda req: None if req.url.startswith(local) else outside.append(req.url))
    try:
        page.goto(f"http://127.0.0.1:{cfg.neo4j_http_port}/browser/")
        address = page.get_by_test_id("boltaddress")
        address.wait_for(timeout=30_000)
        assert address.input_value().endswith(cfg.neo4j_uri.rsplit(":", 1)[-1])  # advertised Bolt port
        page.get_by_test_id("username").fill(cfg.neo4j_user)
        page.get_by_test_id("password").fill(cfg.neo4j_password)
        page.get_by_test_id("connect").click()
        page.get_by_text("You are connected as user").first.wait_for(timeout=20_000)
        editor = page.locator("#monaco-main-editor, .monaco-editor").first
        # As the docs say: the `:param` lines, then the query alone (pasted: no key events, so no
        # auto-closed brackets). Browser lists a block's statements but tables only a lone one.
        editor.click()
        page.keyboard.insert_text("\n".join(line for line in block.splitlines() if line.startswith(":param")))
        page.get_by_test_id("editor-Run").click()
        page.wait_for_function(  # every parameter set before the query runs
            "n => document.querySelectorAll('[data-testid=multi-statement-list-icon][title=\"Status: success\"]')"
            ".length >= n", arg=len(params), timeout=60_000)
        editor.click()
        page.keyboard.insert_text(query)
        page.get_by_test_id("editor-Run").click()
        done = page.get_by_text(re.compile(r"Started streaming \d+ records?"))
        try:
            done.wait_for(timeout=60_000)
        except Exception:
            page.screenshot(path=str(OUTPUT / "neo4j-browser-recipe-failed.png"))
            raise
        summary = done.inner_text()
        cells = page.locator("td").all_inner_texts()
        page.screenshot(path=str(OUTPUT / "neo4j-browser-recipe.png"))
        body = page.inner_text("body").lower()
        page.locator("button[name='Settings']").click()
        page.get_by_role("heading", name="Product Analytics").wait_for(timeout=10_000)
        drawer = page.inner_text("body")
    finally:
        page.close()
    (OUTPUT / "neo4j-browser-outside-requests.txt").write_text("\n".join(outside) + "\n")
    assert f"Started streaming {len(expected)} record" in summary
    assert [f'"{row[0]}"' for row in expected[:3]] == [c for c in cells if c.startswith('"')][:6:2]
    # Telemetry is off in neo4j.conf: no consent banner, no usage-statistics checkbox, no tracking calls.
    # (Community's Browser still fetches its analytics and feedback scripts and web fonts: see README.)
    assert "not configured to send product analytics data in neo4j.conf" in drawer
    assert "Send anonymous usage statistics" not in drawer and "product analytics" not in body
    assert not [url for url in outside if "api.segment.io" in url or "/api/v1/" in url], outside


def test_ui_shows_a_shoppers_recommendations_and_interest_graph(shop, base_url, browser):
    """/ui?user=... renders the recommendations the API gives, the picture, and the system's pulse."""
    expected = requests.get(f"{base_url}/v1/users/{SHOPPER}/recommendations?k=10", timeout=30).json()["results"]
    interests = requests.get(f"{base_url}/v1/users/{SHOPPER}/interests?k=8", timeout=30)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    problems, outside = [], []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("request", lambda req: None if req.url.startswith(base_url) else outside.append(req.url))
    try:
        page.goto(f"{base_url}/ui?user={SHOPPER}")
        page.locator("#recs li").first.wait_for(timeout=20_000)
        page.wait_for_function("window.igGraph && window.igGraph.nodes().length > 1", timeout=20_000)
        page.wait_for_function("document.querySelector('#model').textContent.length > 1 "
                               "&& document.querySelector('#model').textContent !== '–'", timeout=20_000)
        shown = page.locator("#recs li").evaluate_all("rows => rows.map(r => r.dataset.item)")
        graph = page.evaluate("({nodes: igGraph.nodes().map(n => [n.id(), n.data('kind')]),"
                              " edges: igGraph.edges().length,"
                              " drawn: igGraph.nodes().every(n => n.renderedBoundingBox().w > 0)})")
        canvas = page.locator("#graph canvas").count()
        drift_points = page.locator("#drift polyline").get_attribute("points") if interests.ok else None
        reasons = page.locator("#recs .because").count()
        model = page.inner_text("#model")
        page.wait_for_function("document.querySelector('#model-metrics').textContent.length > 0", timeout=20_000)
        metrics_text = page.inner_text("#model-metrics")
        page.screenshot(path=str(OUTPUT / "ui-shopper.png"), full_page=True)
    finally:
        page.close()
    assert not problems, problems
    assert not outside, outside  # everything the page needs is served by the app
    assert shown == [r["item_id"] for r in expected]
    kinds = dict(graph["nodes"])
    assert kinds[f"u:{SHOPPER}"] == "user" and graph["edges"] >= len(shown[:8]) and graph["drawn"] and canvas
    assert {f"i:{i}" for i in shown[:8]} <= set(kinds)
    assert model == shop
    # The model's metrics in words and units, not (:Model).metrics' internal names.
    served = requests.get(f"{base_url}/v1/stats", timeout=30).json()["pipeline"]["model"]["metrics"]
    assert not any(name in metrics_text for name in served if "_" in name), metrics_text
    if "recall@20" in served:
        assert f"Recall@20 (share of held-out items in the top 20) {100 * served['recall@20']:.1f} %" in metrics_text
    if interests.ok:  # served by this API: the strongest items are drawn and the drift is charted
        strongest = {f"i:{i['item_id']}" for i in interests.json()["items"]}
        assert strongest and all(kinds[n] in ("strong", "rec") for n in strongest)
        assert len(drift_points.split()) == len(interests.json()["history"]) >= 2
    if any(r.get("because") for r in requests.get(f"{base_url}/v1/users/{SHOPPER}/recommendations?k=10&explain=true",
                                                   timeout=30).json()["results"]):
        assert reasons > 0


def test_under_kafka_ingest_the_page_shows_the_events_not_yet_folded(cfg, shop, serve, browser):
    """IG_INGEST=kafka: the System panel shows the consumers' lag, the accepted events not yet in the graph
    (none fold here: no consumer runs); under direct ingest the tile is hidden."""
    from confluent_kafka.admin import AdminClient

    from app import kafka_local
    from app.ingest import log
    kafka_local.start(cfg)
    name = uuid.uuid4().hex[:10]
    kcfg = dataclasses.replace(cfg, ingest="kafka", kafka_topic=f"events-{name}", kafka_group=f"fold-{name}")
    base = serve(kcfg)
    now = int(time.time() * 1000)
    reply = requests.post(f"{base}/v1/events", headers=SERVICE, timeout=30, json=[
        {"event_id": f"{name}-{n}", "user_id": SHOPPER, "item_id": "sku-1", "type": "view", "ts": now} for n in range(30)])
    assert reply.status_code == 200 and reply.json()["accepted"] == 30
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        page.goto(f"{base}/ui")
        page.wait_for_function("!document.querySelector('#log-tile').hidden "
                               "&& document.querySelector('#log-lag').textContent === '30'", timeout=20_000)
        page.goto(f"{serve(cfg)}/ui")  # direct ingest
        page.wait_for_function("document.querySelector('#accepted').textContent !== '–'", timeout=20_000)
        assert page.locator("#log-tile").is_hidden()
    finally:
        page.close()
        AdminClient({"bootstrap.servers": kcfg.kafka_bootstrap}).delete_topics(
            [kcfg.kafka_topic, log.dead_topic(kcfg)], operation_timeout=10)


@pytest.mark.parametrize("k", [10, 30])
def test_interest_graph_labels_are_readable_and_apart(shop, base_url, browser, k):
    """With k recommended items (10, then 30) every label of the interest graph is drawn whole inside the
    picture at 12 px, and no two labels overlap; screenshots var/test-output/ui-graph-<k>.png."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        page.goto(f"{base_url}/ui?user={SHOPPER}&k={k}")
        page.wait_for_function(f"window.igGraph && igGraph.nodes(\"[kind = 'rec']\").length === {k}", timeout=20_000)
        labels = page.evaluate("""igGraph.nodes().map(n => {
            const b = n.renderedBoundingBox({includeNodes: false, includeEdges: false, includeLabels: true});
            return {id: n.id(), x1: b.x1, x2: b.x2, y1: b.y1, y2: b.y2,
                    px: parseFloat(n.renderedStyle("font-size")), text: n.data("label")};
        })""")
        box = page.evaluate("(() => { const g = document.querySelector('#graph'); "
                            "return {w: g.clientWidth, h: g.clientHeight}; })()")
        page.locator("#graph").screenshot(path=str(OUTPUT / f"ui-graph-{k}.png"))
    finally:
        page.close()
    assert sum(label["id"].startswith("i:") for label in labels) >= k
    assert all(label["px"] >= 12 and label["text"] for label in labels), labels
    outside = [b["id"] for b in labels if b["x1"] < 0 or b["y1"] < 0 or b["x2"] > box["w"] or b["y2"] > box["h"]]
    assert not outside, (outside, box)
    overlaps = [(a["id"], b["id"]) for n, a in enumerate(labels) for b in labels[n + 1:]
                if a["x1"] < b["x2"] and b["x1"] < a["x2"] and a["y1"] < b["y2"] and b["y1"] < a["y2"]]
    assert not overlaps, overlaps
