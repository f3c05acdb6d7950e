"""``Publisher``: where the worker's outputs go (``scores``, ``dead-letters``,
``model-updates``), so that the handlers need no producer of their own and benches and tests
can run them without a broker.

- ``KafkaPublisher`` sends through one ``KafkaProducer`` (``stream.producer.open_producer``);
- ``DiscardingPublisher`` counts what it is given and sends nothing (benches, tests).

``publish`` queues one record and raises ``kafka.errors.MessageSizeTooLargeError`` for one
over the producer's limit (the worker's outputs are bounded so that it does not happen:
``stream.admission``); ``flush`` returns once every queued record is acknowledged.
"""

from __future__ import annotations

from typing import Protocol

from kafka import KafkaProducer

FLUSH_TIMEOUT_S = 30.0


class Publisher(Protocol):
    """Where the worker's output records go."""

    def publish(self, topic: str, key: bytes | None, value: bytes,
                partition: int | None = None) -> None:
        """Queue one record for ``topic`` (in ``partition`` when given, else by its key)."""

    def flush(self) -> None:
        """Return once every queued record is acknowledged."""

    def close(self) -> None:
        """Flush and release the connection."""


class KafkaPublisher:
    """A ``Publisher`` over one ``KafkaProducer`` (which it closes)."""

    def __init__(self, producer: KafkaProducer, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        self.producer = producer
        self.timeout_s = timeout_s

    def publish(self, topic: str, key: bytes | None, value: bytes,
                partition: int | None = None) -> None:
        self.producer.send(topic, key=key, value=value, partition=partition)

    def flush(self) -> None:
        self.producer.flush(timeout=self.timeout_s)

    def close(self) -> None:
        self.producer.close(timeout=self.timeout_s)


class DiscardingPublisher:
    """A ``Publisher`` that sends nothing; ``published[topic]`` counts what it was given."""

    def __init__(self) -> None:
        self.published: dict[str, int] = {}

    def publish(self, topic: str, key: bytes | None, value: bytes,
                partition: int | None = None) -> None:
        self.published[topic] = self.published.get(topic, 0) + 1

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None
