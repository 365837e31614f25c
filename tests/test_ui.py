"""The /ui page's server side: the page, its local assets, and the public system state it reads."""
from __future__ import annotations

import requests

from app.embeddings import store


def test_page_and_its_assets_are_served_locally(base_url):
    page = requests.get(f"{base_url}/ui?user=anyone", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "/ui/vendor/cytoscape.min.js" in page.text and "/ui/static/ui.js" in page.text
    assert "://" not in "".join(line for line in page.text.splitlines() if "src=" in line or "href=" in line)
    library = requests.get(f"{base_url}/ui/vendor/cytoscape.min.js", timeout=10)
    assert library.status_code == 200 and "cytoscape" in library.text[:2000].lower()
    assert requests.get(f"{base_url}/ui/static/ui.js", timeout=10).status_code == 200


def test_only_listed_vendor_files_are_served(base_url):
    for name in ("package.json", "..%2Fpackage.json", "cytoscape.cjs.js"):
        answer = requests.get(f"{base_url}/ui/vendor/{name}", timeout=10)
        assert answer.status_code == 404 and answer.json()["error"]["status"] == 404


def test_stats_carry_the_public_pipeline_state_without_worker_identities(cfg, base_url, clean_db, lease):
    run = {"mode": "incremental", "finished_at": 1_767_225_600_000, "seconds": 0.25, "changed_edges": 3,
           "users": 2, "items": 1}
    with clean_db.session(database=cfg.neo4j_database) as s:
        s.execute_write(lambda tx: store.advance(tx, 1, run, lease.owner))
    body = requests.get(f"{base_url}/v1/stats", timeout=10).json()
    pipeline = body["pipeline"]
    assert {"lag_seconds", "last_refresh_at", "model", "recent_runs", "counts", "worker_active"} <= set(pipeline)
    assert pipeline["recent_runs"] == [run] and pipeline["last_refresh_at"] == run["finished_at"]
    assert pipeline["worker_active"] is True and lease.owner not in str(body)
    assert isinstance(body["accepted"], int)
