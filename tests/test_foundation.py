"""The real Neo4j server, migrations, config and the health probes."""
from __future__ import annotations

import shutil
import socket
import stat
import subprocess
import sys

import pytest
import requests

from app import cypher, config as config_module
from app import migrate, neo4j_local
from app.config import load_config


def test_cypher_round_trip_on_real_server(cfg, clean_db):
    with clean_db.session(database=cfg.neo4j_database) as s:
        s.run("CREATE (:User {id: $id})", id="u-roundtrip").consume()
        assert s.run("MATCH (u:User {id: $id}) RETURN count(u) AS n", id="u-roundtrip").single()["n"] == 1
        version = s.run("CALL dbms.components() YIELD versions RETURN versions[0] AS v").single()["v"]
    assert version.startswith("5.26")


def test_browser_is_served(cfg):
    page = requests.get(f"http://127.0.0.1:{cfg.neo4j_http_port}/browser/", timeout=10)
    assert page.status_code == 200 and "Neo4j Browser" in page.text


def test_schema_has_constraints_and_vector_indexes(cfg, driver):
    with driver.session(database=cfg.neo4j_database) as s:
        names = {r["name"]: r for r in s.run("SHOW INDEXES YIELD name, type, options")}
    assert {"user_id", "item_id", "event_id", "user_changed_at", "interacted_changed_at"} <= set(names)
    vector = names["item_embedding"]
    assert vector["type"] == "VECTOR"
    assert vector["options"]["indexConfig"]["vector.dimensions"] == cfg.vector_dim


def test_migrate_resizes_the_vector_indexes_to_the_embedding_size(cfg, driver):
    """Changing IG_EMBED_DIM / IG_SHARP_DIM and migrating rebuilds the indexes at the new size
    (vectors of another size would silently stay out of them)."""
    def size():
        with driver.session(database=cfg.neo4j_database) as s:
            return {r["name"]: r["dim"] for r in s.run(cypher.VECTOR_INDEX_SIZES)}
    try:
        assert migrate.fit_vector_indexes(driver, cfg.neo4j_database, 17)
        assert size() == {"user_embedding": 17, "item_embedding": 17}
    finally:
        migrate.fit_vector_indexes(driver, cfg.neo4j_database, cfg.vector_dim)
    assert size() == {"user_embedding": cfg.vector_dim, "item_embedding": cfg.vector_dim}
    assert not migrate.fit_vector_indexes(driver, cfg.neo4j_database, cfg.vector_dim)


def test_unique_constraint_is_enforced(cfg, clean_db):
    with clean_db.session(database=cfg.neo4j_database) as s:
        s.run("CREATE (:Item {id: 'dup'})").consume()
        with pytest.raises(Exception, match="already exists"):
            s.run("CREATE (:Item {id: 'dup'})").consume()


def test_migrate_twice_applies_nothing(cfg):
    run = [sys.executable, "-m", "app", "migrate"]
    first = subprocess.run(run, capture_output=True, text=True, check=True)
    second = subprocess.run(run, capture_output=True, text=True, check=True)
    assert "0 migration(s) applied" in second.stdout, first.stdout + second.stdout
    info = subprocess.run(run + ["--info"], capture_output=True, text=True, check=True).stdout
    assert "V001" in info and "applied" in info


def test_edited_applied_migration_is_refused(cfg, driver, tmp_path):
    for m in migrate.discover():
        shutil.copy(m.path, tmp_path / m.path.name)
    edited = tmp_path / "V001__initial_schema.cypher"
    edited.write_text(edited.read_text() + "\n// an innocent-looking edit\n")
    with pytest.raises(migrate.MigrationError, match="V001__initial_schema.cypher"):
        migrate.migrate(driver, cfg.neo4j_database, {"embed_dim": cfg.vector_dim}, tmp_path)


def test_pending_migration_is_listed(cfg, driver, tmp_path):
    for m in migrate.discover():
        shutil.copy(m.path, tmp_path / m.path.name)
    (tmp_path / "V999__later.cypher").write_text("RETURN 1;\n")
    states = {s["file"]: s["state"] for s in migrate.info(driver, cfg.neo4j_database, tmp_path)}
    assert states["V999__later.cypher"] == "pending"
    assert states["V001__initial_schema.cypher"] == "applied"


def test_bad_migration_name_is_refused(tmp_path):
    (tmp_path / "001_schema.cypher").write_text("RETURN 1;")
    with pytest.raises(migrate.MigrationError, match="001_schema.cypher"):
        migrate.discover(tmp_path)


def test_password_generated_once_with_mode_0600(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "ENV_FILE", tmp_path / ".env")
    monkeypatch.delenv("NEO4J_PASSWORD", raising=False)
    first = load_config().neo4j_password
    assert first and load_config().neo4j_password == first
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600


def test_initial_password_may_start_with_a_dash(cfg, tmp_path):
    """Generated passwords are URL-safe base64: one in 64 starts with '-', which neo4j-admin read as an option."""
    local = load_config(neo4j_password="-x" + "a" * 10, home=tmp_path)
    paths = {**neo4j_local._paths(local), "lib": neo4j_local._paths(cfg)["lib"]}  # the jars CI already has
    paths["data"].mkdir(parents=True)
    neo4j_local._write_conf(local, paths)
    neo4j_local._set_initial_password(local, shutil.which("java"), paths)
    assert (paths["data"] / "dbms" / "auth.ini").exists()


def test_port_in_use_gives_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = load_config(home=tmp_path, neo4j_uri=f"bolt://127.0.0.1:{port}")
        with pytest.raises(neo4j_local.Neo4jError, match=f"port {port} is already in use"):
            neo4j_local.start(cfg)


def test_missing_java_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = load_config(home=tmp_path, neo4j_uri="bolt://127.0.0.1:7999", neo4j_http_port=7998)
    with pytest.raises(neo4j_local.Neo4jError, match="`java` not found"):
        neo4j_local.start(cfg)


def test_healthz_and_json_errors(base_url):
    assert requests.get(f"{base_url}/healthz", timeout=5).json() == {"status": "ok"}
    missing = requests.get(f"{base_url}/no-such-route", timeout=5)
    assert missing.status_code == 404
    assert missing.json()["error"]["status"] == 404


# /readyz with Neo4j stopped: tests/test_faults.py (on a server of its own).


def test_wrong_password_gives_clear_error(cfg):
    wrong = load_config(neo4j_password="not-the-password")
    with pytest.raises(neo4j_local.Neo4jError, match="rejected the password"):
        neo4j_local.start(wrong)


def test_metrics_endpoint(base_url):
    requests.get(f"{base_url}/healthz", timeout=5)
    body = requests.get(f"{base_url}/metrics", timeout=10).text
    assert 'ig_http_request_seconds_count{method="GET",route="/healthz",status="200"}' in body
    assert "ig_refresh_lag_seconds" in body and "ig_nodes" in body
