"""Ingest: events -> validation -> cleaning -> idempotent weighted edges in Neo4j.

`pipeline.ingest` is the one entry point shared by the REST API and the bulk loaders.
"""
