"""The `interest-graph` command line: one verb per job, all driven by the same Config."""
from app.cli import data, evaluate, jobs, servers  # noqa: F401 - each module adds its commands to `main`
from app.cli.base import main
from app.cli.data import DEMO_DATA

__all__ = ["DEMO_DATA", "main"]
