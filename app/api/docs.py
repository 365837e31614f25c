"""The OpenAPI 3.1 document and the interactive docs page, both generated from app/api/schemas.py."""
from __future__ import annotations

from flask import redirect
from flask_openapi3 import Info, OpenAPI
from pydantic import ValidationError

from app.api.schemas import RAW_BODIES, ErrorOut
from app.errors import error_response

SECURITY = {"bearer": {"type": "http", "scheme": "bearer"}}


def validation_error(exc: ValidationError):
    """A request that fails its model: 400 in the one error shape, naming the first field at fault."""
    first = exc.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"]]
    field = loc[0] if loc else None
    message = first["msg"].removeprefix("Value error, ")
    return error_response(400, f"{field}: {message}" if field else message, field=field)


def make_app(import_name: str) -> OpenAPI:
    """A Flask app that validates requests against the declared models and documents them.

    Swagger UI's assets come with the `flask-openapi3-swagger` package and are served locally under
    /docs/swagger; the document is at /openapi.json (and /docs/openapi.json, where the page reads it).
    """
    app = OpenAPI(import_name, info=Info(title="interest-graph", version="1"),
                  security_schemes=SECURITY, doc_prefix="/docs", doc_url="/openapi.json",
                  validation_error_status=400, validation_error_model=ErrorOut,
                  validation_error_callback=validation_error)
    app.add_url_rule("/openapi.json", "openapi_json", lambda: spec(app))
    app.add_url_rule("/docs", "docs", lambda: redirect("/docs/swagger"))
    return app


def spec(app: OpenAPI) -> dict:
    """The OpenAPI document, with the schemas of the bodies read as raw JSON arrays filled in."""
    doc = app.api_doc
    for ops in doc.get("paths", {}).values():  # the library documents its 400 as a list of errors; ours is one
        for operation in ops.values():
            content = operation.get("responses", {}).get("400", {}).get("content", {}).get("application/json", {})
            if content.get("schema", {}).get("type") == "array":
                content["schema"] = content["schema"]["items"]
    for (path, method), schema in RAW_BODIES.items():
        operation = doc.get("paths", {}).get(path, {}).get(method)
        if operation is not None and "requestBody" not in operation:
            operation["requestBody"] = {"required": schema.get("type") == "array",
                                        "content": {"application/json": {"schema": schema}}}
    return doc
