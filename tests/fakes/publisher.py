"""``FakePublisher``: ``transport.ports.BrokerPublisher`` in memory, recording what it publishes.

Held to ``transport.publisher.Publisher`` on RabbitMQ by ``tests/contracts/broker_contract.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from schemas import Message, encode, kind_of
from schemas.topology import (
    CONTROL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE_HEADER,
    DEAD_LETTER_REASON_HEADER,
    INSTRUCTIONS_EXCHANGE,
    LOCATIONS_EXCHANGE,
    REQUESTS_EXCHANGE,
    STATUS_EXCHANGE,
)
from transport.delivery import settle
from transport.errors import BrokerRefused, BrokerUnavailable, TransportError
from transport.ports import BrokerPublisher, InboundDelivery

from .broker import FakeBroker, Stored

log = logging.getLogger(__name__)

#: The exchanges ``transport.topology.declare_topology`` declares.
TOPOLOGY_EXCHANGES = frozenset(
    {
        DEAD_LETTER_EXCHANGE,
        REQUESTS_EXCHANGE,
        INSTRUCTIONS_EXCHANGE,
        CONTROL_EXCHANGE,
        LOCATIONS_EXCHANGE,
        STATUS_EXCHANGE,
    }
)


@dataclass(frozen=True)
class Published:
    """One publish the (fake) broker confirmed."""

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    kind: str | None
    #: The message, when it was published as one (not as raw bytes).
    message: Message | None = None


class FakePublisher:
    """``transport.ports.BrokerPublisher`` in memory: records every confirmed publish.

    A publish to an exchange that does not exist is refused (``BrokerRefused``), as by
    RabbitMQ; with ``broker`` given, the exchanges are the broker's and what is published is
    routed into its queues. ``failure``, when set, is raised by every publish (a
    ``BrokerUnavailable`` stands for a broker gone past the retry deadline; the fake does not
    wait for it).
    """

    def __init__(
        self, broker: FakeBroker | None = None, exchanges: frozenset[str] = TOPOLOGY_EXCHANGES
    ) -> None:
        self.broker = broker
        self._exchanges = set(exchanges)
        self.published: list[Published] = []
        self.failure: TransportError | None = None
        self.closed = False
        #: Called with each confirmed publish: a test's stand-in for a peer that answers.
        self.answerers: list[Callable[[Published], None]] = []

    @property
    def exchanges(self) -> set[str]:
        return set(self.broker.exchanges) if self.broker is not None else self._exchanges

    def delete_exchange(self, name: str) -> None:
        if self.broker is not None:
            self.broker.delete_exchange(name)
        self._exchanges.discard(name)

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Message,
        headers: dict[str, Any] | None = None,
    ) -> None:
        await self._publish(
            exchange,
            routing_key,
            encode(message),
            headers,
            str(message.message_id),
            kind_of(message),
            message,
        )

    async def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        kind: str | None = None,
    ) -> None:
        await self._publish(exchange, routing_key, body, headers, message_id, kind, None)

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None,
        message_id: str | None,
        kind: str | None,
        message: Message | None,
    ) -> None:
        await asyncio.sleep(0)
        if self.failure is not None:
            raise self.failure
        if self.closed:
            raise BrokerUnavailable("the publisher is closed")
        if exchange not in self.exchanges:
            raise BrokerRefused(
                f"the broker refused a publish to {exchange}: NOT_FOUND - no exchange"
            )
        record = Published(
            exchange, routing_key, body, dict(headers or {}), message_id, kind, message
        )
        if self.broker is not None:
            for queue in self.broker.route(exchange, routing_key):
                queue.put(
                    Stored(body, routing_key, exchange, dict(headers or {}), message_id, kind, 2)
                )
        self.published.append(record)
        for answer in self.answerers:
            answer(record)

    async def dead_letter(self, message: InboundDelivery, queue: str, reason: str) -> None:
        headers = {DEAD_LETTER_REASON_HEADER: reason[:1000], DEAD_LETTER_QUEUE_HEADER: queue}
        await self.publish_raw(
            DEAD_LETTER_EXCHANGE, queue, message.body, headers, message_id=message.message_id
        )

    async def reject(self, message: InboundDelivery, queue: str, reason: str) -> None:
        try:
            await self.dead_letter(message, queue, reason)
        except Exception as exc:
            log.error("could not dead-letter a message from %s: %s", queue, exc)
        await settle(message.ack())

    async def close(self) -> None:
        self.closed = True

    # -------------------------------------------------------------------- views

    def to(self, exchange: str) -> list[Published]:
        return [p for p in self.published if p.exchange == exchange]

    @property
    def events(self) -> list[Message]:
        """The messages published to the status exchange, in order."""
        return [p.message for p in self.to(STATUS_EXCHANGE) if p.message is not None]

    @property
    def dead_letters(self) -> list[Published]:
        return self.to(DEAD_LETTER_EXCHANGE)


if TYPE_CHECKING:

    def _a_port(fake: FakePublisher) -> BrokerPublisher:
        return fake  # mypy: the fake is a BrokerPublisher
