"""The /ui page: a shopper's interests and recommendations, an item's audience, the system's pulse.

It reads the same public REST API as any client; this blueprint only serves the page, its script
and the graph-drawing library installed from the npm registry by `make install` (no CDN at run time).
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, abort, render_template, send_from_directory

HERE = Path(__file__).resolve().parent
# Only these files of node_modules are served: the page needs nothing else.
VENDOR = {"cytoscape.min.js": HERE / "node_modules" / "cytoscape" / "dist"}

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static")


@bp.get("")
@bp.get("/")
def page():
    """The page; `?user=` or `?item=` opens a lookup at once."""
    return render_template("ui/index.html", graph_library=(VENDOR["cytoscape.min.js"] / "cytoscape.min.js").exists())


@bp.get("/vendor/<name>")
def vendor(name: str):
    """A browser library from node_modules (404 when `make install` has not installed it)."""
    folder = VENDOR.get(name)
    if folder is None or not (folder / name).exists():
        abort(404, description=f"{name} is not installed: run `make install` (npm ci in app/ui)")
    return send_from_directory(folder, name, max_age=3600)
