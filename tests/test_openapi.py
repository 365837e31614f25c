"""The OpenAPI document and the docs page, over real HTTP."""
from __future__ import annotations

import re

import requests


def test_openapi_document_lists_every_route(app, base_url):
    doc = requests.get(f"{base_url}/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(("/docs", "/openapi", "/static")):
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method) in documented, (path, method)
    recs = doc["paths"]["/v1/users/{user_id}/recommendations"]["get"]
    assert {p["name"] for p in recs["parameters"]} >= {"user_id", "k", "category", "max_price", "exclude_seen",
                                                        "explain"}
    assert recs["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    for path, ops in doc["paths"].items():  # every documented 400 is the one error object
        for method, operation in ops.items():
            bad = operation["responses"].get("400")
            assert bad is None or bad["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut"), path
    events = doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert events["type"] == "array" and "event_id" in events["items"]["properties"]


def test_docs_page_is_served_without_external_network(base_url):
    page = requests.get(f"{base_url}/docs", timeout=10)
    assert page.status_code == 200 and "swagger-ui" in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and not [a for a in assets if a.startswith(("http:", "https:", "//"))]
    for asset in assets:
        assert requests.get(f"{base_url}/docs/{asset}", timeout=10).status_code == 200, asset
    assert requests.get(f"{base_url}/docs/openapi.json", timeout=10).json()["openapi"].startswith("3.1")


def test_bad_parameters_are_400_naming_the_field(base_url):
    for path, params, field in [
        ("/v1/users/u/recommendations", {"k": "abc"}, "k"),
        ("/v1/users/u/recommendations", {"k": 0}, "k"),
        ("/v1/users/u/recommendations", {"max_price": "-1"}, "max_price"),
        ("/v1/users/u/recommendations", {"explain": "maybe"}, "explain"),
        ("/v1/users/u/recommendations", {"exclude_seen": "maybe"}, "exclude_seen"),
        ("/v1/items/i/similar", {"k": 100_000}, "k"),
        ("/v1/items/i/audience", {"include_known": "perhaps"}, "include_known"),
        ("/v1/users/churn-risk", {"min_events": 1}, "min_events"),
    ]:
        answer = requests.get(f"{base_url}{path}", params=params, timeout=10)
        assert answer.status_code == 400, (path, params, answer.text)
        error = answer.json()["error"]
        assert error["status"] == 400 and error["field"] == field and error["message"], (path, params, error)
