"""Stream evaluation: an event file replayed in time order through the ingest path, scored before each batch."""
