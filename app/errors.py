"""One JSON error shape for every failure: {"error": {"status", "message", ...details}}."""
from __future__ import annotations

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException


class ApiError(Exception):
    """An error to return to the client with a status and optional details (e.g. the field)."""

    def __init__(self, status: int, message: str, **details):
        super().__init__(message)
        self.status, self.message, self.details = status, message, details


def error_response(status: int, message: str, **details):
    """Build the JSON error response."""
    response = jsonify({"error": {"status": status, "message": message, **details}})
    response.status_code = status
    return response


def register(app: Flask) -> None:
    """Route every error through error_response."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.message, **exc.details)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return error_response(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        return error_response(500, "internal server error")
