"""Logging for every process: quiet by default, optionally JSON, with the API's request id."""
from __future__ import annotations

import contextvars
import logging
import re
import uuid

from app.config import Config

REQUEST_ID = contextvars.ContextVar("request_id", default=None)
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # a caller's id is echoed into logs: keep it inert
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s"
# Libraries whose INFO lines are per tick or per connection: news only at WARNING.
QUIET = {"apscheduler": logging.WARNING, "neo4j": logging.WARNING,
         # "skipped: maximum number of running instances reached" is max_instances=1 doing its job.
         "apscheduler.scheduler": logging.ERROR}


class _RequestIdFilter(logging.Filter):
    """Stamp each record with the request id of the request that logged it (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        record.request_id = rid
        record.request_tag = f" [{rid}]" if rid else ""
        return True


def request_id(incoming: str | None) -> str:
    """The caller's X-Request-ID when it is a sane token, else a new one."""
    if incoming and _VALID_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex


def formatter(fmt: str) -> logging.Formatter:
    """A text or JSON (python-json-logger) formatter."""
    if fmt == "json":
        from pythonjsonlogger.core import RESERVED_ATTRS
        from pythonjsonlogger.json import JsonFormatter
        return JsonFormatter(JSON_FIELDS, datefmt="%Y-%m-%dT%H:%M:%S%z",
                             rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                             reserved_attrs=[*RESERVED_ATTRS, "request_tag"])
    return logging.Formatter(TEXT_FORMAT)


def setup(cfg: Config) -> None:
    """Configure the root logger once per process from IG_LOG_LEVEL and IG_LOG_FORMAT."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_ig", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler._ig = True
        handler.addFilter(_RequestIdFilter())
        root.addHandler(handler)
    handler.setFormatter(formatter(cfg.log_format))
    root.setLevel(cfg.log_level)
    for name, level in QUIET.items():  # at DEBUG everything speaks
        logging.getLogger(name).setLevel(logging.NOTSET if cfg.log_level == "DEBUG" else level)


def init_app(app) -> None:
    """Carry X-Request-ID in and out of every request and into its log lines; log requests at DEBUG."""
    import time

    from flask import g, request

    access = logging.getLogger("app.access")

    @app.before_request
    def _take_id():
        g.ig_request_id = request_id(request.headers.get("X-Request-ID"))
        g.ig_request_token = REQUEST_ID.set(g.ig_request_id)
        g.ig_request_t0 = time.perf_counter()

    @app.after_request
    def _give_id(response):
        if "ig_request_id" in g:
            response.headers["X-Request-ID"] = g.ig_request_id
            if access.isEnabledFor(logging.DEBUG):  # else not even the line's arguments are built
                access.debug("%s %s %d %.1fms", request.method, request.full_path.rstrip("?"),
                             response.status_code, (time.perf_counter() - g.ig_request_t0) * 1000)
        return response

    @app.teardown_request
    def _drop_id(_exc):
        token = g.pop("ig_request_token", None)
        if token is not None:
            REQUEST_ID.reset(token)
