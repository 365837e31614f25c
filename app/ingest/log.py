"""The event log in Kafka: topics, the message form of a prepared event, the producer and the group's lag."""
from __future__ import annotations

import logging
import math
import os
import threading
import time

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from app.config import Config
from app.errors import Overloaded

log = logging.getLogger(__name__)

FIELDS = {"id": str, "u": str, "i": str, "ts": int, "type": str, "w": float, "qty": float}


class Poison(ValueError):
    """A message the consumer cannot fold (unparseable or not an event); its text is the reason."""


def dead_topic(cfg: Config) -> str:
    """Where the consumer puts poison messages, each with a `reason` header."""
    return f"{cfg.kafka_topic}.dead"


def client_conf(cfg: Config, **extra) -> dict:
    """Settings every client shares; librdkafka's own log goes to Python logging."""
    return {"bootstrap.servers": cfg.kafka_bootstrap, "logger": log, **extra}


def ensure_topics(cfg: Config) -> None:
    """Create the event topic and its dead-letter topic when missing (idempotent)."""
    admin = AdminClient(client_conf(cfg))
    existing = admin.list_topics(timeout=10).topics
    wanted = [NewTopic(t, num_partitions=cfg.kafka_partitions if t == cfg.kafka_topic else 1)
              for t in (cfg.kafka_topic, dead_topic(cfg)) if t not in existing]
    for topic, future in (admin.create_topics(wanted, operation_timeout=10).items() if wanted else ()):
        try:
            future.result()
        except KafkaException as exc:  # another process created it meanwhile
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise


def encode(event: dict, counts: dict | None = None) -> bytes:
    """One prepared event (pipeline.prepare's stored form) as a message; `counts`: the batch's outcome
    counters (rejected, quarantined, duplicates within it), carried by its first message."""
    return orjson.dumps({**event, "c": counts} if counts else event)


def decode(value: bytes | None) -> tuple[dict | None, dict]:
    """A message -> (the event or None for counters alone, its counters); Poison when it is neither."""
    try:
        data = orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        raise Poison(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Poison(f"not a JSON object but {type(data).__name__}")
    counts = data.pop("c", None) or {}
    if not isinstance(counts, dict) or not all(isinstance(v, int) and v >= 0 for v in counts.values()):
        raise Poison("field c: counters must be non-negative integers")
    if not data:
        if not counts:
            raise Poison("neither an event nor counters")
        return None, counts
    for name, kind in FIELDS.items():
        value = data.get(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = data[name] = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is float and not math.isfinite(value)):
            raise Poison(f"field {name}: expected {kind.__name__}, got {value!r:.60}")
    if set(data) - set(FIELDS):
        raise Poison(f"unknown fields {sorted(set(data) - set(FIELDS))}")
    return data, counts


class EventLog:
    """A process's idempotent producer (acks=all): a batch is acknowledged once every message is in the log."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # linger: requests arriving together share a produce request; idempotence: a retried send is
        # written once, in order, so one user's events keep the order they were accepted in.
        self.producer = Producer(client_conf(cfg, **{"enable.idempotence": True, "acks": "all",
                                                     "linger.ms": 5, "compression.type": "lz4"}))

    def append(self, events: list[dict], counts: dict, wait: float) -> None:
        """Write a prepared batch keyed by user; Overloaded when the broker has not acknowledged it all
        within `wait` s (some messages may still land: a resend is then a duplicate the consumer drops)."""
        results = []  # one entry a delivery report (list.append is atomic: any thread's poll may serve them)

        def delivered(err, _msg):
            results.append(err)
        messages = [(e["u"].encode(), encode(e, counts if n == 0 else None)) for n, e in enumerate(events)]
        if not messages:  # nothing kept: the counters still travel through the log
            messages = [(None, encode({}, counts))]
        deadline = time.monotonic() + wait
        for key, value in messages:
            while True:
                try:
                    self.producer.produce(self.cfg.kafka_topic, value, key, on_delivery=delivered)
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    if time.monotonic() > deadline:
                        raise Overloaded("kafka producer queue full") from None
                    self.producer.poll(0.01)
        while len(results) < len(messages) and time.monotonic() < deadline:
            self.producer.poll(0.005)
        failures = [err for err in results if err is not None]
        if len(results) < len(messages) or failures:
            raise Overloaded(f"kafka did not acknowledge the batch ({failures[0] if failures else 'timed out'})")


_lock = threading.Lock()
_logs: dict[tuple, EventLog] = {}


def event_log(cfg: Config) -> EventLog:
    """This process's EventLog for `cfg` (created lazily, again after a fork; topics ensured once)."""
    key = (os.getpid(), cfg.kafka_bootstrap, cfg.kafka_topic)
    with _lock:
        if key not in _logs:
            ensure_topics(cfg)
            _logs[key] = EventLog(cfg)
    return _logs[key]


def lag(cfg: Config, timeout: float = 2.0) -> dict:
    """The consumer group's lag: messages in the topic past its committed offsets, in total and per partition."""
    consumer = Consumer(client_conf(cfg, **{"group.id": cfg.kafka_group, "enable.auto.commit": False}))
    try:
        meta = consumer.list_topics(cfg.kafka_topic, timeout=timeout).topics.get(cfg.kafka_topic)
        if meta is None or meta.error is not None:
            return {"topic": cfg.kafka_topic, "group": cfg.kafka_group, "messages": 0, "partitions": {}}
        parts = [TopicPartition(cfg.kafka_topic, p) for p in sorted(meta.partitions)]
        deadline = time.monotonic() + timeout
        while True:
            try:
                committed = consumer.committed(parts, timeout=timeout)
                break
            except KafkaException:  # the group coordinator is still loading (a new broker): ask again
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        per = {}
        for tp in committed:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            per[tp.partition] = high - (tp.offset if tp.offset >= 0 else low)
        return {"topic": cfg.kafka_topic, "group": cfg.kafka_group, "messages": sum(per.values()),
                "partitions": per}
    finally:
        consumer.close()


def lag_summary(cfg: Config) -> dict:
    """`lag` with partitions named as text (JSON keys), or no figure while the broker does not answer."""
    try:
        lag_now = lag(cfg)
    except Exception:  # noqa: BLE001 - the broker away: the stats and the scrape still answer
        return {"topic": cfg.kafka_topic, "group": cfg.kafka_group, "messages": None, "partitions": {}}
    return {**lag_now, "partitions": {str(p): n for p, n in lag_now["partitions"].items()}}
