"""WSGI entry point for the server (granian)."""
from app import create_app
from app.runtime import spread_connections

app = create_app()
if app.config["IG"].keepalive_requests:
    app = spread_connections(app, app.config["IG"].keepalive_requests)
