"""interest-graph: a real-time GraphSAGE interest graph on Neo4j."""
from __future__ import annotations

import logging

from flask import Flask

from app.config import Config, load_config


def create_app(config: Config | None = None) -> Flask:
    """Build the Flask app; tests pass their own Config."""
    app = Flask(__name__)
    app.config["IG"] = config or load_config()
    app.json.sort_keys = False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from app import errors, metrics
    from app.api import health

    errors.register(app)
    metrics.init_app(app)
    from app.api import auth, guards
    guards.init_app(app)
    auth.init_app(app)
    app.register_blueprint(health.bp)
    from app.api import admin, recs
    app.register_blueprint(admin.bp)
    app.register_blueprint(recs.bp)
    from app.api import events as events_api
    app.register_blueprint(events_api.bp)
    return app
