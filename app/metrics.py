"""Prometheus metrics: request latency and event outcomes, plus the refresh pipeline's state."""
from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess
from prometheus_client.core import GaugeMetricFamily

from app.ingest import log

REQUEST_SECONDS = Histogram("ig_http_request_seconds", "API request latency", ["method", "route", "status"])
EVENTS = Counter("ig_events_total", "Events posted, by outcome", ["outcome"])


class _PipelineCollector:
    """Watermark lag, last run and node counts, read from Neo4j at scrape time."""

    def __init__(self, app: Flask):
        self.app = app

    def collect(self):
        from app.db import get_driver
        from app.status import status
        cfg = self.app.config["IG"]
        try:
            state = status(get_driver(cfg), cfg)
        except Exception:  # noqa: BLE001 - Neo4j away: scrape the rest
            return
        yield GaugeMetricFamily("ig_refresh_lag_seconds", "Age of the oldest unprocessed change",
                                value=state["lag_seconds"])
        last = (state["recent_runs"] or [{}])[0]
        yield GaugeMetricFamily("ig_refresh_last_run_seconds", "Duration of the last refresh run",
                                value=last.get("seconds", 0.0))
        if last.get("finished_at"):  # freshness: a stalled worker shows as a growing age
            yield GaugeMetricFamily("ig_refresh_age_seconds", "Seconds since the last refresh run that did work",
                                    value=max(0.0, time.time() - last["finished_at"] / 1000))
        nodes = GaugeMetricFamily("ig_nodes", "Nodes in the graph", labels=["label"])
        for label, count in state["counts"].items():
            nodes.add_metric([label], count)
        yield nodes
        yield GaugeMetricFamily("ig_worker_active", "1 while a worker holds the lease",
                                value=1.0 if state["worker"]["active"] else 0.0)


class _LogCollector:
    """IG_INGEST=kafka: the consumer group's lag per partition, read from the broker at scrape time."""

    def __init__(self, app: Flask):
        self.app = app

    def collect(self):
        cfg = self.app.config["IG"]
        if cfg.ingest != "kafka":
            return
        lag = log.lag_summary(cfg)
        if lag["messages"] is None:  # the broker away: scrape the rest
            return
        gauge = GaugeMetricFamily("ig_kafka_lag_messages", "Events in the log not yet folded into Neo4j",
                                  labels=["topic", "partition"])
        for partition, n in lag["partitions"].items():
            gauge.add_metric([lag["topic"], partition], n)
        yield gauge


def init_app(app: Flask) -> None:
    """Time every request and serve /metrics (aggregated over gunicorn workers when multiprocess)."""

    @app.before_request
    def _start():
        g.ig_started = time.perf_counter()

    @app.after_request
    def _observe(response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        if route != "/metrics" and hasattr(g, "ig_started"):
            REQUEST_SECONDS.labels(request.method, route, response.status_code).observe(
                time.perf_counter() - g.ig_started)
        return response

    pipeline = _PipelineCollector(app)
    kafka_log = _LogCollector(app)

    @app.get("/metrics", responses={200: {"description": "Prometheus text exposition",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics():
        """Prometheus text exposition."""
        registry = CollectorRegistry()
        try:  # under `interest-graph serve`, PROMETHEUS_MULTIPROC_DIR is set: sum all workers
            multiprocess.MultiProcessCollector(registry)
        except ValueError:
            registry = CollectorRegistry()
            for collector in (REQUEST_SECONDS, EVENTS):
                registry.register(collector)
        registry.register(pipeline)
        registry.register(kafka_log)
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def count_events(report) -> None:
    """Record a batch's outcomes."""
    EVENTS.labels("accepted").inc(report.accepted)
    EVENTS.labels("duplicate").inc(report.duplicates)
    EVENTS.labels("rejected").inc(len(report.rejected))
    for item in report.quarantined:
        EVENTS.labels(f"dropped_{item['reason']}").inc()
