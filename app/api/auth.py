"""Credentials: which bearer token each endpoint needs, checked before any view runs.

| endpoint | token |
| --- | --- |
| `POST /v1/events`, `PUT /v1/items`, any other write under `/v1` | service (`IG_SERVICE_TOKEN`) |
| `DELETE /v1/users/<id>` | privacy (`IG_PRIVACY_TOKEN`) or admin |
| `GET /v1/...`, `POST /v1/recommendations`, `GET /metrics` | read (`IG_READ_TOKEN`) or admin; open with `IG_OPEN_READS=on` |
| `/admin/...`, routed or not | admin (`IG_ADMIN_TOKEN`), always, `IG_AUTH=off` included |
| `/healthz`, `/readyz`, API docs | open |

With `IG_AUTH=off` (local runs on a loopback address only) everything but `/admin` is open.
"""
from __future__ import annotations

import hmac

from flask import Flask, request

from app.config import Config
from app.errors import ApiError

OPEN = ("/healthz", "/readyz", "/openapi", "/docs")
READ_METHODS = ("GET", "HEAD", "OPTIONS")
# Writes by method that only read: batch lookups sent as POST because their body is long.
READ_POSTS = ("/v1/recommendations",)


def matches(given: str, *expected: str | None) -> bool:
    """True when `given` equals one of the configured tokens; every one is compared in constant time."""
    found = False
    for token in expected:
        if token:
            found |= hmac.compare_digest(given.encode(), token.encode())
    return found


def needed(cfg: Config, method: str, rule: str) -> tuple[str, tuple] | None:
    """(name, accepted tokens) for a request, or None when it is open."""
    if rule.startswith("/admin"):
        return "admin", (cfg.admin_token,)
    if rule.startswith(OPEN) or not cfg.auth:
        return None
    if method == "DELETE" and rule.startswith("/v1/users/"):
        return "privacy", (cfg.privacy_token, cfg.admin_token)
    if method in READ_METHODS or rule in READ_POSTS:
        if rule.startswith("/v1/") or rule == "/metrics":
            return None if cfg.open_reads else ("read", (cfg.read_token, cfg.admin_token))
        return None
    return "service", (cfg.service_token,)


def check(cfg: Config) -> None:
    """401 without a bearer token, 403 with a wrong one or when the needed token is not configured."""
    rule = request.url_rule.rule if request.url_rule else None
    if rule is None and request.path.startswith("/admin"):  # closed even where no route matches
        rule = request.path
    need = needed(cfg, request.method, rule) if rule else None
    if need is None:
        return
    name, accepted = need
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header.startswith("Bearer ") else ""
    if not given:
        raise ApiError(401, f"this endpoint needs 'Authorization: Bearer <{name} token>'", field="Authorization")
    if not any(accepted):
        raise ApiError(403, f"this endpoint is disabled: no {name} token is configured", field="Authorization")
    if not matches(given, *accepted):
        raise ApiError(403, f"invalid {name} token", field="Authorization")


def init_app(app: Flask) -> None:
    """Check credentials before every request."""
    app.before_request(lambda: check(app.config["IG"]))
