"""Benchmarks (run against the test Neo4j server)."""
