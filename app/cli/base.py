"""The command group every verb hangs on, and how a command fails."""
from __future__ import annotations

import sys

import click

from app.config import load_config


def fail(message: str) -> None:
    """Print `message` as an error and exit with code 1."""
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


class _Main(click.Group):
    """Settings that cannot be used are one line and exit code 1, whichever command reads them."""

    def invoke(self, ctx):
        from app.config import ConfigError
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            fail(str(exc))


@click.group(cls=_Main)
def main():
    """Real-time GraphSAGE interest graph on Neo4j."""
    from app import logs
    try:
        logs.setup(load_config())
    except ValueError as exc:  # e.g. IG_LOG_LEVEL=LOUD
        fail(str(exc))
