"""A private subscription: an exclusive, auto-deleted queue bound to chosen routing keys.

For followers that want some messages of an exchange while they listen (a script waiting for
its runs, say): the queue lives as long as the connection, and each message is acked as it is
taken.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

import aio_pika.abc

from .connection import TRANSIENT, Connection
from .errors import BrokerUnavailable
from .ports import InboundDelivery


@dataclass(frozen=True)
class Received:
    routing_key: str
    body: bytes


class Subscription:
    """Messages routed to a private queue by the bindings added so far."""

    def __init__(
        self, channel: aio_pika.abc.AbstractChannel, queue: aio_pika.abc.AbstractQueue
    ) -> None:
        self._channel = channel
        self._queue = queue

    @classmethod
    async def open(cls, connection: Connection) -> Subscription:
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        except TRANSIENT as exc:
            raise BrokerUnavailable(f"cannot open a subscription: {exc!r}") from exc
        return cls(channel, queue)

    async def bind(self, exchange: str, routing_key: str) -> None:
        """Receive, from now on, what ``exchange`` routes with ``routing_key`` (a pattern)."""
        try:
            await self._queue.bind(exchange, routing_key=routing_key)
        except TRANSIENT as exc:
            raise BrokerUnavailable(f"cannot bind {routing_key!r}: {exc!r}") from exc

    async def consume(self, on_message: Callable[[str, InboundDelivery], Awaitable[None]]) -> None:
        """Hand each message to ``on_message(queue name, delivery)``, which settles it."""
        try:
            await self._queue.consume(functools.partial(on_message, self._queue.name))
        except TRANSIENT as exc:
            raise BrokerUnavailable(f"cannot consume from {self._queue.name}: {exc!r}") from exc

    async def messages(self) -> AsyncGenerator[Received, None]:
        """Every message as it arrives (acked as taken), until the connection ends."""
        async with self._queue.iterator() as incoming:
            async for raw in incoming:
                await raw.ack()
                yield Received(raw.routing_key or "", raw.body)

    async def close(self) -> None:
        """Close its channel (the queue goes with it). Idempotent."""
        if not self._channel.is_closed:
            with contextlib.suppress(*TRANSIENT):
                await self._channel.close()
