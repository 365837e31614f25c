"""interest-graph: a real-time GraphSAGE interest graph on Neo4j."""
from __future__ import annotations

import orjson
from flask import Flask
from flask.json.provider import DefaultJSONProvider

from app.api.docs import make_app, spec

from app.config import Config, load_config


class _OrjsonProvider(DefaultJSONProvider):
    """Flask's JSON answers encoded by orjson, a fraction of the standard library's cost per answer.

    Keys keep their order; NaN is null."""

    options = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY

    def dumps(self, obj, **kwargs) -> str:
        return orjson.dumps(obj, default=self.default, option=self.options).decode()

    def response(self, *args, **kwargs):
        body = orjson.dumps(self._prepare_response_obj(args, kwargs), default=self.default, option=self.options)
        return self._app.response_class(body, mimetype=self.mimetype)


def create_app(config: Config | None = None) -> Flask:
    """Build the Flask app; tests pass their own Config."""
    app = make_app(__name__)
    app.config["IG"] = config or load_config()
    app.json = _OrjsonProvider(app)

    from app import errors, logs, metrics
    logs.setup(app.config["IG"])
    logs.init_app(app)
    from app.api import health

    errors.register(app)
    metrics.init_app(app)
    from app.api import auth, guards
    guards.init_app(app)
    auth.init_app(app)
    app.register_api(health.bp)
    from app.api import admin, recs
    app.register_api(admin.bp)
    app.register_api(recs.bp)
    from app.api import events as events_api
    app.register_api(events_api.bp)
    from app import ui
    app.register_blueprint(ui.bp)  # the page is not part of the API document
    spec(app)  # build the document once every route is registered
    guards.describe(app.api_doc, app.config["IG"])
    from app.api.schemas import document_bounds
    document_bounds(app.api_doc, app.config["IG"])
    return app
