"""WSGI entry point for the server (granian)."""
from app import create_app

app = create_app()
