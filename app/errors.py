"""One JSON error shape for every failure: {"error": {"status", "message", ...details}}."""
from __future__ import annotations

from concurrent.futures import TimeoutError as WaitTimeout

from flask import Flask, current_app, jsonify
from neo4j.exceptions import AuthError, DriverError, Neo4jError, TransientError
from werkzeug.exceptions import HTTPException


class ApiError(Exception):
    """An error to return to the client with a status and optional details (e.g. the field)."""

    def __init__(self, status: int, message: str, **details):
        super().__init__(message)
        self.status, self.message, self.details = status, message, details


class Overloaded(Exception):
    """This process cannot take more work now (a bounded queue is full): 503 with Retry-After."""


class NotReady(Overloaded):
    """This process cannot answer yet (its copy of the graph is loading): 503 with Retry-After."""


def error_response(status: int, message: str, **details):
    """Build the JSON error response."""
    response = jsonify({"error": {"status": status, "message": message, **details}})
    response.status_code = status
    return response


def unavailable_reason(exc: BaseException) -> str | None:
    """Why Neo4j could not serve a request, in words fit for a client (never the exception's text),
    or None when `exc` is not about Neo4j's availability."""
    if isinstance(exc, AuthError):
        return "neo4j refused the configured credentials"
    if isinstance(exc, Overloaded):
        return str(exc)
    if isinstance(exc, WaitTimeout):
        return "neo4j did not answer in time"
    if isinstance(exc, DriverError):  # unreachable, connection lost, pool exhausted, commit unknown
        return "neo4j unreachable"
    code = getattr(exc, "code", None) or ""
    # A transaction stopped by its timeout reports TransactionTimedOut, or LockClientStopped when it
    # was waiting for a lock.
    if isinstance(exc, TransientError) or any(c in code for c in ("TransactionTimedOut", "Terminated",
                                                                    "LockClientStopped")):
        return "neo4j busy or timed out"
    return None


def unavailable(reason: str):
    """503 with Retry-After: the client should send the same request again (event ids make it safe)."""
    response = error_response(503, reason)
    response.headers["Retry-After"] = str(current_app.config["IG"].retry_after)
    return response


def register(app: Flask) -> None:
    """Route every error through error_response."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.message, **exc.details)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return error_response(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(DriverError)
    @app.errorhandler(Neo4jError)
    @app.errorhandler(WaitTimeout)
    @app.errorhandler(Overloaded)
    def _neo4j(exc: Exception):
        reason = unavailable_reason(exc)
        if reason is None:
            return _unexpected(exc)
        app.logger.warning("503 %s: %s", reason, type(exc).__name__)
        return unavailable(reason)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        return error_response(500, "internal server error")
