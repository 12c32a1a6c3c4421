"""The broker as its users see it, and the clock: small Protocols.

The aio-pika adapter (``publisher.Publisher``, aio-pika's incoming messages) satisfies them, and
so do the in-memory fakes of the tests (``tests/fakes``); the same contract tests
(``tests/contracts``) hold both to one behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from schemas import Message

#: Seconds, from whatever origin the caller agreed on (``time.monotonic``, ``time.time``).
Clock = Callable[[], float]


class InboundDelivery(Protocol):
    """One delivery taken from a queue, as a consumer reads and settles it.

    Settled once: a second ack, nack or reject raises. A delivery whose channel has closed
    cannot be settled any more (it raises one of ``connection.TRANSIENT``); the broker has put
    it back in its queue.
    """

    @property
    def body(self) -> bytes: ...

    @property
    def message_id(self) -> str | None: ...

    @property
    def routing_key(self) -> str | None: ...

    @property
    def user_id(self) -> str | None:
        """Who published it, as the broker checked (None when the publisher set none)."""
        ...

    @property
    def processed(self) -> bool:
        """Settled (acked, nacked or rejected) on this side."""
        ...

    async def ack(self) -> None: ...

    async def nack(self, *, requeue: bool = True) -> None: ...

    async def reject(self, *, requeue: bool = False) -> None: ...


class EventPublisher(Protocol):
    """Publishes messages, each confirmed by the broker before the call returns."""

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Message,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Raises ``BrokerUnavailable`` (not confirmed in time) or ``BrokerRefused``."""
        ...


class DeadLetterer(Protocol):
    """Takes poison messages out of the way, with their reason."""

    async def dead_letter(self, message: InboundDelivery, queue: str, reason: str) -> None:
        """Publish ``message`` to the dead-letter exchange with ``reason``; it stays unsettled."""
        ...

    async def reject(self, message: InboundDelivery, queue: str, reason: str) -> None:
        """Dead-letter ``message``, then ack it, even when the dead letter could not be sent."""
        ...


class BrokerPublisher(EventPublisher, DeadLetterer, Protocol):
    """The publishing side of the broker, whole: what an agent holds."""

    async def close(self) -> None: ...
