"""Request guards that run before any view: rate limits, body size, path-parameter length."""
from __future__ import annotations

import dataclasses
import re

from flask import Flask, current_app, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from app.api import auth
from app.errors import ApiError
from app.ingest.schema import MAX_ID

UNLIMITED = ("/healthz", "/readyz", "/metrics")


def _check_size(app: Flask) -> None:
    """413 from the Content-Length header alone, before a byte of the body is read; Werkzeug's
    MAX_CONTENT_LENGTH stops chunked bodies at the same bound while they are read."""
    limit = app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"body of {request.content_length} bytes exceeds the limit of {limit}", limit=limit)


def _check_path() -> None:
    """400 for an id in the path longer than any stored id can be."""
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str) and len(value) > MAX_ID:
            raise ApiError(400, f"{name} must be at most {MAX_ID} characters", field=name)


def _cost() -> int:
    """What a request costs against the rate limit: a batch call one request per user it asks for."""
    # Each user is a recommendation's work; past IG_MAX_BATCH_USERS the view refuses the call.
    if request.method == "POST" and request.path == "/v1/recommendations":
        body = request.get_json(silent=True)
        users = body.get("user_ids") if isinstance(body, dict) else None
        if isinstance(users, list):
            return max(1, min(len(users), current_app.config["IG"].max_batch_users))
    return 1


def init_app(app: Flask) -> None:
    """Install the body limit, the path check and, when IG_RATE_LIMIT is set, per-client rate limits."""
    cfg = app.config["IG"]
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.before_request(lambda: _check_size(app))
    app.before_request(_check_path)
    if cfg.rate_limit:
        # Per client address (behind a proxy, wrap the app in werkzeug's ProxyFix so it is the client's);
        # storage is per process unless IG_RATE_LIMIT_STORAGE names a shared one (e.g. redis://).
        # One budget per client across all endpoints (not one per endpoint); a batch call costs its users.
        Limiter(get_remote_address, app=app, application_limits=[cfg.rate_limit],
                storage_uri=cfg.rate_limit_storage, headers_enabled=True, application_limits_cost=_cost,
                application_limits_exempt_when=lambda: request.path.startswith(UNLIMITED))


def describe(doc: dict, cfg) -> None:
    """Add to every operation of the OpenAPI document what the guards may answer instead of it
    (413, 429, 503) and the credential it needs (401, 403), per app/api/auth.py."""
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
    policy = dataclasses.replace(cfg, auth=True)
    for path, ops in doc.get("paths", {}).items():
        if path.startswith(("/docs", "/openapi", "/healthz")):
            continue
        rule = re.sub(r"\{(\w+)\}", r"<\1>", path)
        for method, op in ops.items():
            responses = op.setdefault("responses", {})

            def add(code: int, text: str) -> None:
                responses.setdefault(str(code), {"description": text, **error})
            add(413, "The body is larger than IG_MAX_BODY_BYTES")
            if not path.startswith(UNLIMITED):
                add(429, "Over the client's rate limit (IG_RATE_LIMIT); see Retry-After")
            if path != "/metrics":
                add(503, "Neo4j unreachable, busy or timed out; send the same request again after Retry-After")
            need = auth.needed(policy, method.upper(), rule)
            if need is not None:
                op["security"] = [{"bearer": []}]
                add(401, f"No bearer token (the {need[0]} token)")
                add(403, f"A wrong token, or no {need[0]} token is configured")
