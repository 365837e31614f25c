"""Request guards that run before any view: rate limits, body size, path-parameter length."""
from __future__ import annotations

from flask import Flask, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

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


def init_app(app: Flask) -> None:
    """Install the body limit, the path check and, when IG_RATE_LIMIT is set, per-client rate limits."""
    cfg = app.config["IG"]
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.before_request(lambda: _check_size(app))
    app.before_request(_check_path)
    if cfg.rate_limit:
        # Per client address (behind a proxy, wrap the app in werkzeug's ProxyFix so it is the client's);
        # storage is per process unless IG_RATE_LIMIT_STORAGE names a shared one (e.g. redis://).
        # One budget per client across all endpoints (not one per endpoint).
        Limiter(get_remote_address, app=app, application_limits=[cfg.rate_limit],
                storage_uri=cfg.rate_limit_storage, headers_enabled=True,
                application_limits_exempt_when=lambda: request.path.startswith(UNLIMITED))
