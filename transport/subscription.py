"""A private subscription: an exclusive, auto-deleted queue bound to chosen routing keys.

For followers that want some messages of an exchange while they listen (a script waiting for
its runs, say): the queue lives as long as the connection, and is declared again, bound again
and consumed again when the connection comes back (what was routed to it meanwhile is lost:
``when_restored`` says when to catch up).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

import aio_pika.abc

from .connection import TRANSIENT, Connection
from .errors import BrokerUnavailable
from .ports import InboundDelivery

#: How soon a consume that met a connection being restored is tried again.
RETRY_S = 0.2


@dataclass(frozen=True)
class Received:
    routing_key: str
    body: bytes


class Subscription:
    """Messages routed to a private queue by the bindings added so far."""

    def __init__(
        self,
        connection: Connection,
        channel: aio_pika.abc.AbstractChannel,
        queue: aio_pika.abc.AbstractQueue,
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._queue = queue
        #: Ends each ``messages()`` under way (at ``close``).
        self._ends: set[Callable[[], None]] = set()

    @classmethod
    async def open(cls, connection: Connection) -> Subscription:
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        except TRANSIENT as exc:
            raise BrokerUnavailable(f"cannot open a subscription: {exc!r}") from exc
        return cls(connection, channel, queue)

    async def bind(self, exchange: str, routing_key: str) -> None:
        """Receive, from now on, what ``exchange`` routes with ``routing_key`` (a pattern)."""
        try:
            await self._queue.bind(exchange, routing_key=routing_key)
        except TRANSIENT as exc:
            raise BrokerUnavailable(f"cannot bind {routing_key!r}: {exc!r}") from exc

    def when_restored(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the queue is back after its channel or connection was
        lost: a private queue goes with its connection, and what was routed to it in between
        is lost. The queue, its bindings and its consumer are restored before the call."""
        if isinstance(self._channel, aio_pika.abc.AbstractRobustChannel):
            self._channel.reopen_callbacks.add(lambda *_: callback())

    async def consume(self, on_message: Callable[[str, InboundDelivery], Awaitable[None]]) -> None:
        """Hand each message to ``on_message(queue name, delivery)``, which settles it."""
        try:
            await self._queue.consume(functools.partial(on_message, self._queue.name))
        except TRANSIENT as exc:
            raise BrokerUnavailable(f"cannot consume from {self._queue.name}: {exc!r}") from exc

    async def messages(self) -> AsyncGenerator[Received, None]:
        """Every message as it arrives (taken without acks: the queue is private), through
        the connection's losses and returns (what was routed to the queue meanwhile is lost:
        ``when_restored``), until this subscription or its connection is closed."""
        incoming: asyncio.Queue[Received | None] = asyncio.Queue()

        async def take(raw: aio_pika.abc.AbstractIncomingMessage) -> None:
            incoming.put_nowait(Received(raw.routing_key or "", raw.body))

        def end(*_: object) -> None:
            incoming.put_nowait(None)

        while True:
            try:
                tag = await self._queue.consume(take, no_ack=True)
                break
            except TRANSIENT as exc:
                if self._connection.is_closed:
                    raise BrokerUnavailable(
                        f"cannot consume from {self._queue.name}: {exc!r}"
                    ) from exc
                # The connection is being restored: the queue is, too.
                await asyncio.sleep(RETRY_S)
        closing = asyncio.ensure_future(self._connection.closed())
        closing.add_done_callback(end)
        self._ends.add(end)
        try:
            while (message := await incoming.get()) is not None:
                yield message
        finally:
            self._ends.discard(end)
            closing.remove_done_callback(end)
            closing.cancel()
            if not self._channel.is_closed:
                with contextlib.suppress(*TRANSIENT):
                    await self._queue.cancel(tag)

    async def close(self) -> None:
        """Close its channel (the queue goes with it); ``messages()`` end. Idempotent."""
        for end in list(self._ends):
            end()
        if not self._channel.is_closed:
            with contextlib.suppress(*TRANSIENT):
                await self._channel.close()
