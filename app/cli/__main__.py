"""`python -m app.cli` runs the CLI."""
from app.cli import main

main()
