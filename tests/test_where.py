"""`interest-graph where` (the end of `make run`): every address a newcomer needs, once the API answers."""
from __future__ import annotations

import os
import subprocess
import sys

from app.config import ROOT


def test_where_prints_the_api_page_browser_user_and_password_location(cfg, base_url):
    port = base_url.rsplit(":", 1)[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IG_HOST": "127.0.0.1", "IG_PORT": port}
    env.pop("NEO4J_PASSWORD", None)
    done = subprocess.run([sys.executable, "-m", "app.cli", "where", "--wait", "30"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"API            {base_url}\n" in out  # answering: no "(not answering yet)"
    for line in (f"{base_url}/docs", f"{base_url}/ui", f"http://127.0.0.1:{cfg.neo4j_http_port}/browser/",
                 f"Neo4j user     {cfg.neo4j_user}", f"NEO4J_PASSWORD in {ROOT / '.env'}"):
        assert line in out
    assert cfg.neo4j_password not in out  # where the password is, never the password itself
