"""docker/: no Docker engine here, so the files are checked statically (compose against the Compose
Specification's JSON Schema, vendored in tests/schemas) and the dashboard against the live /metrics."""
from __future__ import annotations

import json
import re

import jsonschema
import requests
import yaml

from app.config import KAFKA_VERSION, ROOT
from app.embeddings import store
from tests.conftest import SERVICE

DOCKER = ROOT / "docker"
SCHEMAS = ROOT / "tests" / "schemas"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "dashboards" / "interest-graph.json").read_text())


def test_compose_file_follows_the_compose_specification():
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(compose())
    broken = {**compose(), "services": {"api": {"image": "x", "ports": "8000"}}}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))  # the schema does reject things


def test_compose_runs_the_whole_service():
    services = compose()["services"]
    assert {"neo4j", "migrate", "api", "worker", "prometheus", "grafana"} <= set(services)
    neo4j = services["neo4j"]
    assert neo4j["image"] == "neo4j:5.26" and "cypher-shell" in " ".join(neo4j["healthcheck"]["test"])
    assert {v.split(":")[1] for v in neo4j["volumes"]} == {"/data", "/logs"}
    assert neo4j["environment"]["NEO4J_client_allow__telemetry"].endswith("false}")
    assert services["migrate"]["depends_on"]["neo4j"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no" and services["migrate"]["command"][-1] == "migrate"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["api"]["command"][-1] == "serve" and services["worker"]["command"][-1] == "worker"
    kafka, consume = services["kafka"], services["consume"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}" and kafka["profiles"] == consume["profiles"] == ["kafka"]
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert consume["command"][-1] == "consume" and consume["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["api"]["environment"]["IG_KAFKA_BOOTSTRAP"] == "kafka:9092"
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["api:8000"]


def test_dockerfile_is_multi_stage_and_runs_as_a_non_root_user():
    text = (DOCKER / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(stages) >= 2
    runtime = text.split("\nFROM ")[-1]
    users = re.findall(r"^USER\s+(\S+)", runtime, flags=re.M)
    assert users and users[-1] not in ("root", "0") and "HEALTHCHECK" in runtime
    assert "npm ci" in text and "package-lock.json" in text


def test_grafana_provisioning_points_at_the_dashboard():
    provider = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "interest-graph.yml").read_text())
    mounts = compose()["services"]["grafana"]["volumes"]
    path = provider["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{path}:ro" in mounts
    source = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard()["panels"]}
    assert uids == {source["datasources"][0]["uid"]}


def test_dashboard_is_valid_and_reads_only_metrics_the_api_exports(cfg, base_url, clean_db, lease):
    schema = json.loads((SCHEMAS / "grafana-dashboard.schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(dashboard())
    titles = {p["title"] for p in dashboard()["panels"]}
    assert {"Ingest rate", "Refresh lag", "Freshness", "Request latency"} <= titles
    # Make every series exist: one event, one request, one recorded refresh run.
    requests.post(f"{base_url}/v1/events", json=[{"event_id": "dash-1", "user_id": "u", "item_id": "i",
                                                  "type": "view", "ts": 1_767_225_600_000}],
                  headers=SERVICE, timeout=30).raise_for_status()
    with clean_db.session(database=cfg.neo4j_database) as s:
        s.execute_write(lambda tx: store.advance(tx, 1, {"mode": "incremental", "seconds": 0.1,
                                                         "finished_at": 1_767_225_600_000}, lease.owner))
    exported = set(re.findall(r"^(ig_[a-z_]+)", requests.get(f"{base_url}/metrics", timeout=30).text, flags=re.M))
    used = {name for p in dashboard()["panels"] for t in p["targets"] for name in re.findall(r"\big_[a-z_]+", t["expr"])}
    assert used and used <= exported, used - exported


def test_compose_takes_every_credential_from_the_environment():
    """No password or token has a default in the file: each must be set (`${VAR:?...}`); reads need a
    token, which Prometheus sends from a secret; the erasure secret is shared by the API and the worker."""
    services = compose()["services"]
    required = re.compile(r"^\$\{(\w+):\?[^}]*\}$")
    assert required.match(services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"])
    env = services["api"]["environment"]
    for name in ("NEO4J_PASSWORD", "IG_ADMIN_TOKEN", "IG_SERVICE_TOKEN", "IG_PRIVACY_TOKEN", "IG_READ_TOKEN",
                 "IG_ERASURE_SECRET"):
        assert required.match(env[name]).group(1) == name, name
    assert "IG_OPEN_READS" not in env and services["worker"]["environment"]["IG_ERASURE_SECRET"] == env["IG_ERASURE_SECRET"]
    assert compose()["secrets"]["read_token"] == {"environment": "IG_READ_TOKEN"}
    assert "read_token" in services["prometheus"]["secrets"]
    job = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"][0]
    assert job["authorization"]["credentials_file"] == "/run/secrets/read_token"
