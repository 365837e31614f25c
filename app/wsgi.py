"""WSGI entry point for the server (granian): one import per worker process."""
import threading

from app import create_app
from app.api import recs
from app.runtime import spread_connections

app = create_app()
threading.Thread(target=recs.preload, args=(app,), daemon=True).start()
if app.config["IG"].keepalive_requests:
    app = spread_connections(app, app.config["IG"].keepalive_requests)
