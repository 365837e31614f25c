"""Credentials, secrets, rate limits, body and value bounds, hostile input: over real HTTP and Neo4j."""
from __future__ import annotations

import http.client
import ipaddress
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from urllib.parse import quote, urlparse

import psutil
import pytest
import requests
from click.testing import CliRunner
from neo4j import GraphDatabase
from neo4j.exceptions import AuthError

from app import create_app, neo4j_local
from app.cli import main as cli
from app.config import load_config
from app.ingest import group, schema
from tests.conftest import PRIVACY, SERVICE, HeldItem
from tests.test_ingest import count, ev, post
from tests.test_serving import served  # noqa: F401 - a trained graph for the erasure's traces

ADMIN = {"Authorization": f"Bearer {os.environ['IG_ADMIN_TOKEN']}"}
WRONG = {"Authorization": "Bearer not-a-token"}


def _variant(cfg, **changes):
    return type(cfg)(**{**cfg.__dict__, **changes})


# --- credentials --------------------------------------------------------------
def test_each_write_needs_its_token(cfg, clean_db, base_url):
    url = f"{base_url}/v1/events"
    missing = requests.post(url, json=[ev(1)], timeout=10)
    assert missing.status_code == 401 and missing.json()["error"]["field"] == "Authorization"
    assert requests.post(url, json=[ev(1)], headers=WRONG, timeout=10).status_code == 403
    assert requests.post(url, json=[ev(1)], headers=PRIVACY, timeout=10).status_code == 403
    assert count(clean_db, cfg, "MATCH (e:Event) RETURN count(e)") == 0  # nothing written by refused calls
    assert requests.post(url, json=[ev(1, user="alice")], headers=SERVICE, timeout=10).status_code == 200

    items = f"{base_url}/v1/items"
    assert requests.put(items, json=[{"item_id": "i1"}], timeout=10).status_code == 401
    assert requests.put(items, json=[{"item_id": "i1"}], headers=ADMIN, timeout=10).status_code == 403
    assert requests.put(items, json=[{"item_id": "i1"}], headers=SERVICE, timeout=10).status_code == 200

    erase = f"{base_url}/v1/users/alice"
    assert requests.delete(erase, timeout=10).status_code == 401
    assert requests.delete(erase, headers=SERVICE, timeout=10).status_code == 403
    assert count(clean_db, cfg, "MATCH (u:User {id: 'alice'}) RETURN count(u)") == 1
    assert requests.delete(erase, headers=PRIVACY, timeout=10).status_code == 204
    assert requests.delete(erase, headers=ADMIN, timeout=10).status_code == 204
    assert count(clean_db, cfg, "MATCH (u:User {id: 'alice'}) RETURN count(u)") == 0
    # Reads are open in the suite, which sets IG_OPEN_READS=on.
    assert requests.get(f"{base_url}/v1/stats", timeout=10).status_code == 200


def test_read_token_guards_reads_and_metrics_but_not_probes(cfg, clean_db, serve):
    url = serve(_variant(cfg, read_token="test-read-token", open_reads=False))
    read = {"Authorization": "Bearer test-read-token"}
    for path in ("/v1/stats", "/v1/users/alice/recommendations", "/metrics"):
        assert requests.get(url + path, timeout=10).status_code == 401, path
        assert requests.get(url + path, headers=SERVICE, timeout=10).status_code == 403, path
        assert requests.get(url + path, headers=read, timeout=10).status_code in (200, 404), path
    assert requests.get(url + "/v1/stats", headers=ADMIN, timeout=10).status_code == 200
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    assert requests.get(url + "/readyz", timeout=10).status_code == 200
    # The read token opens no write.
    assert requests.post(url + "/v1/events", json=[ev(1)], headers=read, timeout=10).status_code == 403


def test_unset_token_disables_its_endpoints(cfg, clean_db, serve):
    url = serve(_variant(cfg, service_token=None))
    reply = requests.post(url + "/v1/events", json=[ev(1)], headers=SERVICE, timeout=10)
    assert reply.status_code == 403 and "no service token is configured" in reply.json()["error"]["message"]


def test_auth_off_only_on_loopback(cfg, clean_db, serve, monkeypatch):
    monkeypatch.setenv("IG_AUTH", "off")
    monkeypatch.setenv("IG_HOST", "0.0.0.0")
    with pytest.raises(ValueError, match="local runs only"):
        load_config()
    refused = CliRunner().invoke(cli, ["neo4j", "status"])
    assert refused.exit_code == 1 and "local runs only" in refused.output
    monkeypatch.setenv("IG_HOST", "127.0.0.1")
    local = load_config()
    assert local.auth is False
    url = serve(_variant(cfg, auth=False))
    assert requests.post(url + "/v1/events", json=[ev(1)], timeout=10).status_code == 200
    assert requests.post(url + "/admin/reindex", timeout=10).status_code == 401  # admin stays closed


def test_admin_token_checked(base_url):
    assert requests.get(f"{base_url}/admin/status", timeout=10).status_code == 401
    assert requests.get(f"{base_url}/admin/status", headers=SERVICE, timeout=10).status_code == 403
    assert requests.get(f"{base_url}/admin/status", headers=ADMIN, timeout=10).status_code == 200


def test_secrets_stay_out_of_logs_bodies_metrics_and_process_list(cfg, clean_db, base_url, caplog):
    secrets = [cfg.neo4j_password, cfg.admin_token, cfg.service_token, cfg.privacy_token, cfg.erasure_secret,
               "not-a-token"]
    caplog.set_level(logging.DEBUG)
    bodies = []
    for headers in (WRONG, SERVICE, PRIVACY, ADMIN):
        bodies.append(requests.post(f"{base_url}/v1/events", data=b"{", headers=headers, timeout=10).text)
        bodies.append(requests.delete(f"{base_url}/v1/users/x", headers=headers, timeout=10).text)
        bodies.append(requests.post(f"{base_url}/admin/reindex", json={"mode": "x"}, headers=headers, timeout=10).text)
        bodies.append(requests.get(f"{base_url}/admin/jobs/nope", headers=headers, timeout=10).text)
    bodies.append(requests.get(f"{base_url}/metrics", timeout=10).text)
    bodies.append(requests.get(f"{base_url}/readyz", timeout=10).text)
    cmdlines = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdlines.append(" ".join(proc.info["cmdline"] or []))
    for secret in secrets:
        assert not any(secret in b for b in bodies), "a secret in a response body"
        assert secret not in caplog.text, "a secret in the logs"
        assert not any(secret in c for c in cmdlines), "a secret on a command line"


def test_initial_password_goes_through_a_private_argfile(cfg, tmp_path):
    argfile = tmp_path / "args"
    p = {"lib": Path("/lib")}
    cmd = neo4j_local.set_password_command(_variant(cfg, neo4j_password='-p"w\\d'), "java", p, argfile)
    assert not any('-p"w' in part for part in cmd) and cmd[-1] == f"@{argfile}"
    assert '"-p\\"w\\\\d"' in argfile.read_text() and argfile.stat().st_mode & 0o077 == 0


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_local_neo4j_listens_on_loopback_only_with_auth_on(cfg):
    pid = neo4j_local.status(cfg)["pid"]
    listening = [c.laddr for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(_loopback(addr.ip) for addr in listening), listening
    http_api = requests.post(f"http://127.0.0.1:{cfg.neo4j_http_port}/db/neo4j/query/v2",
                             json={"statement": "RETURN 1"}, timeout=10)
    assert http_api.status_code == 401
    with GraphDatabase.driver(cfg.neo4j_uri, auth=(cfg.neo4j_user, "wrong-password")) as drv:
        with pytest.raises(AuthError):
            drv.verify_connectivity()
    with pytest.raises(neo4j_local.Neo4jError, match="loopback only"):
        neo4j_local.start(_variant(cfg, neo4j_uri="bolt://0.0.0.0:7699"))


# --- rate limits ----------------------------------------------------------------
def test_rate_limit_answers_429_with_retry_after(cfg, clean_db, serve):
    url = serve(_variant(cfg, rate_limit="3/minute"))
    codes = [requests.get(url + "/v1/stats", timeout=10).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = requests.post(url + "/v1/events", json=[ev(1)], headers=SERVICE, timeout=10)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    assert limited.json()["error"]["status"] == 429
    assert count(clean_db, cfg, "MATCH (e:Event) RETURN count(e)") == 0
    assert requests.get(url + "/healthz", timeout=10).status_code == 200  # probes are not limited


def test_no_rate_limit_by_default(cfg, base_url):
    assert cfg.rate_limit is None
    assert all(requests.get(f"{base_url}/healthz", timeout=10).status_code == 200 for _ in range(3))
    assert all(requests.get(f"{base_url}/v1/stats", timeout=10).status_code == 200 for _ in range(30))


# --- body size: 413 from the header alone ---------------------------------------
@pytest.mark.parametrize("method,path", [("POST", "/v1/events"), ("PUT", "/v1/items"),
                                         ("DELETE", "/v1/users/alice"), ("POST", "/admin/reindex"),
                                         ("GET", "/v1/stats"), ("GET", "/healthz")])
def test_body_over_the_limit_is_413_before_it_is_read(cfg, base_url, method, path):
    """The request announces a body of 1 GB and sends none: the answer comes without waiting for it."""
    host = urlparse(base_url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=5)
    conn.putrequest(method, path)
    for name, value in {"Content-Type": "application/json", "Content-Length": str(10**9), **ADMIN}.items():
        conn.putheader(name, value)
    conn.endheaders()
    reply = conn.getresponse()
    body = reply.read()
    conn.close()
    assert reply.status == 413 and b'"limit"' in body


def test_body_just_under_the_limit_is_parsed(cfg, clean_db, serve):
    url = serve(_variant(cfg, max_body_bytes=2_000))
    small = requests.post(url + "/v1/events", json=[ev(1)], headers=SERVICE, timeout=10)
    assert small.status_code == 200
    big = requests.post(url + "/v1/events", json=[ev(k) for k in range(40)], headers=SERVICE, timeout=10)
    assert big.status_code == 413
    # Chunked, with no Content-Length: stopped while reading at the same bound.
    chunks = (b"x" * 500 for _ in range(10))
    chunked = requests.post(url + "/v1/events", data=chunks, headers=SERVICE, timeout=10)
    assert chunked.status_code in (400, 413)
    assert count(clean_db, cfg, "MATCH (e:Event) RETURN count(e)") == 1


# --- hostile values ---------------------------------------------------------------
HOSTILE = [
    "x'}) MATCH (n) DETACH DELETE n //",
    '"; DROP CONSTRAINT event_id; "',
    "`backtick` $param {map: 1}",
    "\\u0027 \\\\ \\\"",
    "ünïcødé 漢字 🛒 \u202e rtl",
    "ctrl \x00\x01\x07\x1b\x7f\n\t end",
    " padded ",
]


def test_hostile_ids_are_stored_and_returned_as_plain_data(cfg, clean_db, base_url):
    events = [ev(k, user=f"u{v}", item=f"i{v}") | {"event_id": f"e{v}"} for k, v in enumerate(HOSTILE)]
    reply = post(base_url, events)
    assert reply.status_code == 200 and reply.json()["accepted"] == len(HOSTILE)
    users = count(clean_db, cfg, "MATCH (u:User) RETURN collect(u.id)")
    assert sorted(users) == sorted(f"u{v}".strip() for v in HOSTILE)  # ids are trimmed, nothing else
    assert count(clean_db, cfg, "MATCH (e:Event) RETURN count(e)") == len(HOSTILE)
    for v in HOSTILE:
        user = ("u" + v).strip()
        if "/" in user:  # a path segment cannot hold one: such an id is reachable by POST only
            continue
        reply = requests.get(f"{base_url}/v1/users/{quote(user, safe='')}/recommendations", timeout=10)
        assert reply.status_code in (200, 404), reply.text  # not embedded yet: a fallback or 404
        assert reply.json().get("user_id", user) == user
    items = [{"item_id": f"i{v}", "title": v * 10, "category": v, "attributes": {"note": v}} for v in HOSTILE]
    reply = requests.put(f"{base_url}/v1/items", json=items, headers=SERVICE, timeout=10)
    assert reply.status_code == 200, reply.text
    stored = count(clean_db, cfg, "MATCH (i:Item {id: $id}) RETURN i {.title, .category, .attr_note}",
                   id=f"i{HOSTILE[0]}")
    assert stored == {"title": HOSTILE[0] * 10, "category": HOSTILE[0], "attr_note": HOSTILE[0]}
    # Erasing a user named like an injection erases that user only.
    victim = quote(f"u{HOSTILE[1]}", safe="")
    assert requests.delete(f"{base_url}/v1/users/{victim}", headers=PRIVACY, timeout=10).status_code == 204
    assert count(clean_db, cfg, "MATCH (u:User) RETURN count(u)") == len(HOSTILE) - 1


TEN_KB = "é" * 10_240


@pytest.mark.parametrize("change,field", [
    ({"user_id": TEN_KB}, "user_id"), ({"item_id": TEN_KB}, "item_id"), ({"event_id": TEN_KB}, "event_id"),
    ({"user_id": "bad \ud800 surrogate"}, "user_id"), ({"weight": 1e300}, "weight"), ({"weight": -1e7}, "weight"),
    ({"user_id": 2**70}, "user_id"), ({"ts": 10**30}, "ts"), ({"quantity": "1e400"}, "quantity"),
])
def test_values_beyond_their_bound_are_rejected_by_name(cfg, clean_db, base_url, change, field):
    reply = post(base_url, [ev(1) | change, ev(2)])
    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert body["error"]["field"] == field and body["rejected"][0]["index"] == 0 and body["accepted"] == 1


@pytest.mark.parametrize("item,field", [
    ({"title": TEN_KB}, "title"), ({"category": "c" * 257}, "category"),
    ({"attributes": {f"a{k}": k for k in range(schema.MAX_ATTRIBUTES + 1)}}, "attributes"),
    ({"attributes": {"note": TEN_KB}}, "attributes.note"), ({"title": "\udfff"}, "title"),
])
def test_item_values_beyond_their_bound_are_rejected_by_name(cfg, clean_db, base_url, item, field):
    reply = requests.put(f"{base_url}/v1/items", json=[{"item_id": "i1", **item}], headers=SERVICE, timeout=10)
    assert reply.status_code == 422 and reply.json()["error"]["field"] == field, reply.text
    assert count(clean_db, cfg, "MATCH (i:Item) RETURN count(i)") == 0


def test_ids_in_the_path_are_bounded(base_url):
    reply = requests.get(f"{base_url}/v1/users/{'u' * 300}/recommendations", timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["field"] == "user_id"
    reply = requests.delete(f"{base_url}/v1/users/{'u' * 300}", headers=PRIVACY, timeout=10)
    assert reply.status_code == 400


def test_one_batch_that_fails_its_transaction_fails_only_its_own_request(cfg, clean_db, driver):
    """Two batches sharing a group commit, one of which cannot be written (two weights whose sum
    overflows): the other still commits, and each request hears only of its own outcome."""
    good = [{"id": "g1", "u": "u1", "i": "i1", "ts": 1, "type": "view", "w": 1.0, "qty": 0.0}]
    bad = [{"id": f"b{k}", "u": "u2", "i": "i2", "ts": 1, "type": "view", "w": 1e308, "qty": 0.0} for k in (1, 2)]
    writer = group.GroupWriter(driver, cfg.neo4j_database, secret=cfg.erasure_secret)
    parts = [(bad, {}, Future()), (good, {}, Future())]
    writer._commit(parts)
    assert parts[1][2].result(timeout=10) == 1
    with pytest.raises(OverflowError):
        parts[0][2].result(timeout=10)
    assert count(clean_db, cfg, "MATCH (e:Event) RETURN collect(e.id)") == ["g1"]


def test_metrics_scrape_writes_nothing(cfg, clean_db, base_url):
    assert count(clean_db, cfg, "MATCH (s:_Refresh) RETURN count(s)") == 0
    assert "ig_nodes" in requests.get(f"{base_url}/metrics", timeout=10).text
    assert count(clean_db, cfg, "MATCH (s:_Refresh) RETURN count(s)") == 0


# --- reads need a token unless opened; /admin is closed whatever its view does ---------------------
READS = ("/v1/stats", "/v1/users/alice/recommendations", "/v1/users/alice/interests", "/v1/users/churn-risk",
         "/v1/items/i1/audience", "/v1/items/i1/similar", "/metrics")


def test_reads_need_a_token_by_default(cfg, clean_db, serve, monkeypatch):
    monkeypatch.delenv("IG_OPEN_READS", raising=False)
    monkeypatch.delenv("IG_READ_TOKEN", raising=False)
    default = load_config()
    url = serve(default)
    batch = {"user_ids": ["alice"]}
    for path in READS:
        assert requests.get(url + path, timeout=10).status_code == 401, path
        assert requests.get(url + path, headers=SERVICE, timeout=10).status_code == 403, path
        assert requests.get(url + path, headers=ADMIN, timeout=10).status_code in (200, 404), path
    assert requests.post(url + "/v1/recommendations", json=batch, timeout=10).status_code == 401
    doc = requests.get(url + "/openapi.json", timeout=10).json()
    assert doc["paths"]["/v1/users/{user_id}/recommendations"]["get"]["security"] == [{"bearer": []}]
    # With a read token set, that token reads; it writes nothing.
    url = serve(_variant(default, read_token="test-read-token"))
    read = {"Authorization": "Bearer test-read-token"}
    assert all(requests.get(url + p, headers=read, timeout=10).status_code in (200, 404) for p in READS)
    assert requests.post(url + "/v1/recommendations", json=batch, headers=read, timeout=10).status_code == 200
    # Opening reads is an explicit setting.
    monkeypatch.setenv("IG_OPEN_READS", "on")
    url = serve(load_config())
    assert all(requests.get(url + p, timeout=10).status_code in (200, 404) for p in READS)
    assert requests.post(url + "/v1/events", json=[ev(1)], timeout=10).status_code == 401


@pytest.mark.parametrize("auth", [True, False])
def test_admin_paths_fail_closed_in_the_central_check(cfg, auth):
    """A view under /admin that forgets its own check, and a path with no view, still need the admin token."""
    from werkzeug.serving import make_server
    app = create_app(_variant(cfg, auth=auth))
    app.add_url_rule("/admin/unguarded", "unguarded", lambda: "open")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert requests.get(url + "/admin/unguarded", timeout=10).status_code == 401
        assert requests.get(url + "/admin/unguarded", headers=SERVICE, timeout=10).status_code == 403
        assert requests.get(url + "/admin/unguarded", headers=ADMIN, timeout=10).status_code == 200
        assert requests.get(url + "/admin/no-such-thing", timeout=10).status_code == 401
        assert requests.get(url + "/admin/no-such-thing", headers=ADMIN, timeout=10).status_code == 404
    finally:
        server.shutdown()


# --- erasure: no race, no trace ---------------------------------------------------------------------
def test_an_old_event_in_flight_during_an_erasure_never_brings_the_user_back(cfg, clean_db, base_url):
    """The ingest reads the erasure records, then waits for an item lock; the erasure commits meanwhile:
    the event (from before the erasure) must not re-create the user once the ingest goes on."""
    now = int(time.time() * 1000)
    assert post(base_url, [ev(1, "victim", "i1", ts=now - 3_600_000)]).json()["accepted"] == 1
    held = HeldItem(clean_db, cfg, "hot")
    out = {}
    try:
        thread = threading.Thread(target=lambda: out.update(
            reply=post(base_url, [ev(2, "victim", "hot", ts=now - 1_800_000), ev(3, "bystander", "hot", ts=now)])))
        thread.start()
        time.sleep(1.0)  # the ingest has read the erasure records and waits for "hot"
        erased = requests.delete(f"{base_url}/v1/users/victim", headers=PRIVACY, timeout=10)
        assert erased.status_code == 204
    finally:
        held.release()
    thread.join(30)
    body = out["reply"].json()
    assert out["reply"].status_code == 200 and (body["accepted"], body["duplicates"]) == (1, 1), body
    assert count(clean_db, cfg, "MATCH (u:User {id: 'victim'}) RETURN count(u)") == 0
    assert count(clean_db, cfg, "MATCH (u:User {id: 'bystander'}) RETURN count(u)") == 1


SHOPPER = "erased-shopper-4711"


def _mentions(driver, cfg, text: str) -> list:
    """Every node or relationship property holding `text` (in a string or a list), anywhere in the graph."""
    query = """
    CALL { MATCH (n) RETURN n AS x, labels(n) AS kind UNION ALL MATCH ()-[r]->() RETURN r AS x, [type(r)] AS kind }
    UNWIND keys(x) AS k
    WITH kind, k, x[k] AS v
    WHERE (v IS :: STRING AND v CONTAINS $text)
       OR (v IS :: LIST<ANY> AND any(e IN v WHERE toString(e) CONTAINS $text))
    RETURN kind, k"""
    with driver.session(database=cfg.neo4j_database) as s:
        return [tuple(r.values()) for r in s.run(query, text=text)]


def test_an_erased_user_leaves_no_id_in_neo4j_or_the_serving_copy(cfg, driver, served, base_url):
    import hashlib
    import hmac

    from app.embeddings import models
    from app.embeddings.refresh import refresh
    from app.serving import graph
    from app.worker import Worker
    now = int(time.time() * 1000)
    post(base_url, [ev(k, SHOPPER, f"i{k}", ts=now - k) for k in range(1, 6)])
    with Worker(cfg).holding() as holder:  # a run that logs the shopper in the serving log
        refresh(driver, cfg, models.current(driver, cfg), owner=holder.owner)
    assert _mentions(driver, cfg, SHOPPER)
    answer = requests.get(f"{base_url}/v1/users/{SHOPPER}/recommendations", timeout=30).json()
    assert answer["source"] == "personal"
    copy = graph.copy_of(driver, cfg.neo4j_database, cfg.serving_sync_wait, cfg.serving_poll, cfg.serving_max_age,
                         cfg.explain_table_mb, secret=cfg.erasure_secret)
    assert SHOPPER in copy.state.users
    assert requests.delete(f"{base_url}/v1/users/{SHOPPER}", headers=PRIVACY, timeout=10).status_code == 204
    assert requests.get(f"{base_url}/v1/users/u1/recommendations", timeout=30).status_code == 200  # the next sync
    assert _mentions(driver, cfg, SHOPPER) == []
    plain = hashlib.sha256(SHOPPER.encode()).hexdigest()
    assert _mentions(driver, cfg, plain) == []  # no unsalted hash either: the record is keyed
    keyed = hmac.new(cfg.erasure_secret.encode(), SHOPPER.encode(), hashlib.sha256).hexdigest()
    assert count(driver, cfg, "MATCH (x:_Erased {key: $key}) RETURN count(x)", key=keyed) == 1
    st = copy.state
    assert SHOPPER not in st.users and not any(SHOPPER in key for key in st.pending)
    again = requests.get(f"{base_url}/v1/users/{SHOPPER}/recommendations", timeout=30).json()
    assert again["source"] == "trending"
