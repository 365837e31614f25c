"""`interest-graph consume`: fold the event log into Neo4j in batches, each event's effect exactly once.

A batch is written through the direct path's writer (claim the ids, drop events of erased users, one
edge update per (user, item)) and only then are its offsets committed. A consumer killed between the
two leaves the batch to be read again, and its claimed ids make the second write add nothing; the
same holds for a replay of the whole topic.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from neo4j.exceptions import DriverError, ResultFailedError, TransientError

from app.config import Config
from app.ingest import log as event_log
from app.ingest import writer

log = logging.getLogger(__name__)
BATCH_GATHER = 0.05  # seconds a batch gathers messages after its first one


def _neo4j_away(exc: BaseException) -> bool:
    """True when a failure is Neo4j's state (down, busy, a deadlock), not something in the batch."""
    cause = exc.__cause__ if isinstance(exc, ResultFailedError) and exc.__cause__ is not None else exc
    return isinstance(cause, (DriverError, TransientError))


class Folder:
    """One member of the consumer group: reads up to IG_CONSUME_BATCH messages, folds them, commits."""

    def __init__(self, cfg: Config, driver, group: str | None = None):
        self.cfg, self.driver = cfg, driver
        event_log.ensure_topics(cfg)
        self.consumer = Consumer(event_log.client_conf(cfg, **{
            "group.id": group or cfg.kafka_group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "partition.assignment.strategy": "cooperative-sticky",
            # A batch waits for Neo4j as long as Neo4j is away; past this the member leaves the group
            # and rejoins on its next read (its uncommitted batch is read again, which adds nothing).
            "max.poll.interval.ms": 600_000,
            "session.timeout.ms": int(cfg.kafka_session_timeout * 1000),
            "heartbeat.interval.ms": int(cfg.kafka_session_timeout * 1000 / 4)}))
        self.consumer.subscribe([cfg.kafka_topic])
        self.dead = Producer(event_log.client_conf(cfg, **{"enable.idempotence": True, "acks": "all"}))
        self.totals = Counter()
        self.pending: dict[tuple[str, int], int] = {}  # offsets a rebalance kept from being committed

    def step(self, timeout: float = 1.0) -> int:
        """Fold one batch (whatever arrived within `timeout` s); return how many messages it held."""
        # Block for the first message only, then take what is already fetched: a batch never waits
        # to fill up, so a quiet topic's events are folded at once.
        first = self.consumer.poll(timeout)
        if first is None:
            self._commit_offsets({})
            return 0
        more = self.consumer.consume(self.cfg.consume_batch - 1, BATCH_GATHER) if self.cfg.consume_batch > 1 else []
        messages = [m for m in [first, *more] if not self._broker_note(m)]
        if not messages:
            return 0
        events, counts, poison = [], Counter(), []
        for m in messages:
            try:
                event, extra = event_log.decode(m.value())
            except event_log.Poison as exc:
                poison.append((m, str(exc)))
                continue
            counts.update(extra)
            if event is not None:
                events.append(event)
        accepted = self._write(events, dict(counts), poison)
        self._dead_letter(poison)
        self._commit_offsets({(m.topic(), m.partition()): m.offset() + 1 for m in messages})
        self.totals.update(messages=len(messages), accepted=accepted, dead=len(poison))
        return len(messages)

    def _commit_offsets(self, offsets: dict) -> None:
        """Commit the next offsets to read, with any a rebalance refused before.

        A refused commit is tried again at the next step: a partition the member keeps (cooperative
        rebalancing) is not read again, so its committed offset would otherwise stay behind for good,
        and the group's lag with it.
        """
        for key, offset in offsets.items():  # messages come in offset order within a partition
            self.pending[key] = max(self.pending.get(key, offset), offset)
        if self.pending:
            # A partition handed to another member is that member's to commit (it reads from the last
            # committed offset): committing ours could move its offset back.
            mine = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
            self.pending = {key: o for key, o in self.pending.items() if key in mine}
        if not self.pending:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in self.pending.items()],
                                 asynchronous=False)
            self.pending = {}
        except KafkaException as exc:  # the group is rebalancing
            log.warning("offsets not committed yet (%s): tried again at the next step", exc)

    def _broker_note(self, message) -> bool:
        """True for an error the client reports in place of a message (logged, not folded)."""
        err = message.error()
        if err is None:
            return False
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("kafka: %s", err)
        return True

    def _commit(self, events: list[dict], counts: dict) -> int:
        """Write events and counters in one transaction, waiting out Neo4j outages; return how many were new."""
        delay = 0.5
        while True:
            try:
                return writer.write_batches(self.driver, self.cfg.neo4j_database, [(events, counts)],
                                            timeout=self.cfg.tx_timeout, secret=self.cfg.erasure_secret)[0]
            except Exception as exc:  # noqa: BLE001 - an outage waits, anything else is the batch's
                if not _neo4j_away(exc):
                    raise
                log.warning("neo4j unavailable (%s): batch of %d events waits %.1f s", type(exc).__name__,
                            len(events), delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _write(self, events: list[dict], counts: dict, poison: list) -> int:
        """Commit the batch; when Neo4j refuses the batch itself, fold each event alone and add the ones
        it refuses to `poison`. Return how many events were new."""
        if not events and not counts:
            return 0
        try:
            return self._commit(events, counts)
        except Exception:  # noqa: BLE001 - find the event Neo4j refuses
            log.warning("neo4j refused a batch of %d events: folding them one by one", len(events))
        accepted = 0
        for event in events:
            try:
                accepted += self._commit([event], {})
            except Exception as exc:  # noqa: BLE001 - this event alone fails: it goes to the dead letters
                poison.append((None, f"neo4j refused the event: {getattr(exc, 'code', type(exc).__name__)}",
                               event))
        return accepted + (self._commit([], counts) if counts else 0)

    def _dead_letter(self, poison: list) -> None:
        """Put each poison message on the dead-letter topic with its reason, before its offset is committed."""
        for entry in poison:
            message, reason = entry[0], entry[1]
            value = message.value() if message is not None else event_log.encode(entry[2])
            key = message.key() if message is not None else entry[2]["u"].encode()
            headers = {"reason": reason.encode()}
            if message is not None:
                headers["source"] = f"{message.topic()}/{message.partition()}/{message.offset()}".encode()
            log.warning("dead letter: %s", reason)
            self.dead.produce(event_log.dead_topic(self.cfg), value, key, headers=headers)
        if poison and self.dead.flush(30):
            raise RuntimeError("the dead-letter topic did not acknowledge its messages")

    def run(self, until=lambda: False, idle: float = 1.0, report_every: float = 10.0) -> Counter:
        """Fold batches until `until()` is true (never, for the `consume` command), logging the totals
        now and then; return the totals."""
        reported = time.monotonic()
        while not until():
            self.step(idle)
            if time.monotonic() - reported >= report_every:
                reported = time.monotonic()
                log.info("folded %(messages)d messages: %(accepted)d new events, %(dead)d dead letters",
                         {"messages": 0, "accepted": 0, "dead": 0, **self.totals})
        return self.totals

    def close(self) -> None:
        """Leave the group (its partitions go to the other members at once)."""
        self.consumer.close()
