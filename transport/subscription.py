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
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika.abc

from .connection import TRANSIENT, Connection
from .errors import BrokerUnavailable
from .ports import InboundDelivery

log = logging.getLogger(__name__)

#: How soon a consume that met a connection being restored is tried again.
RETRY_S = 0.2
#: How often ``messages()`` looks whether its connection is there.
WATCH_S = 0.5
#: How long a connection may be away before ``messages()`` gives up on it: a broker's
#: restart (about 30 s here) or a failover passes, a broker gone for good is said.
GONE_AFTER_S = 90.0


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
        self._closed = False
        #: This subscription's consumer tags, and what to call once the queue is back.
        self._tags: set[str] = set()
        self._restored: list[Callable[[], None]] = []
        self._recovering: set[asyncio.Task[None]] = set()

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

    async def when_restored(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the queue is back after its channel or connection was
        lost, or after the broker cancelled its consumer (the queue was deleted under it): a
        private queue goes with its connection, and what was routed to it in between is
        lost. The queue, its bindings and its consumer are restored before the call."""
        if not isinstance(self._channel, aio_pika.abc.AbstractRobustChannel):
            return
        self._channel.reopen_callbacks.add(lambda *_: callback())
        if not self._restored:
            # A deleted queue is declared, bound and consumed again on the same channel, with
            # no reopen: its consumer's cancel is the only sign. Watched on each new channel.
            self._channel.reopen_callbacks.add(lambda *_: self._watch_cancels())
            await self._watch_cancels()
        self._restored.append(callback)

    async def _watch_cancels(self) -> None:
        # Bounded: a connection lost meanwhile is waited for by get_underlay_channel, and
        # its return reopens the channel, which watches again.
        with contextlib.suppress(*TRANSIENT, TimeoutError):
            async with asyncio.timeout(RETRY_S * 25):
                underlay = await self._channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self._cancelled)

    def _cancelled(self, frame: Any) -> None:
        """The broker cancelled a consumer of this channel (``frame``: its Basic.Cancel)."""
        tag = frame.consumer_tag
        if tag in self._tags and not self._closed:
            task = asyncio.create_task(self._when_back(tag))
            self._recovering.add(task)
            task.add_done_callback(self._recovering.discard)

    async def _when_back(self, tag: str, gone_after_s: float = GONE_AFTER_S) -> None:
        """Once the consumer ``tag`` consumes again, call what waits for the queue's return."""
        deadline = asyncio.get_running_loop().time() + gone_after_s
        while asyncio.get_running_loop().time() < deadline and not self._closed:
            await asyncio.sleep(RETRY_S)
            with contextlib.suppress(*TRANSIENT):
                underlay = await self._channel.get_underlay_channel()
                if tag in getattr(underlay, "consumers", ()):
                    for callback in self._restored:
                        callback()
                    return
        if not self._closed:
            log.warning(
                "the consumer %s the broker cancelled did not come back within %.0f s: "
                "what was sent to its queue meanwhile may be lost",
                tag,
                gone_after_s,
            )

    async def consume(self, on_message: Callable[[str, InboundDelivery], Awaitable[None]]) -> None:
        """Hand each message to ``on_message(queue name, delivery)``, which settles it."""
        try:
            self._tags.add(
                await self._queue.consume(functools.partial(on_message, self._queue.name))
            )
        except TRANSIENT as exc:
            raise BrokerUnavailable(f"cannot consume from {self._queue.name}: {exc!r}") from exc

    async def messages(self, gone_after_s: float = GONE_AFTER_S) -> AsyncGenerator[Received, None]:
        """Every message as it arrives (taken without acks: the queue is private), through
        the connection's losses and returns (what was routed to the queue meanwhile is lost:
        ``when_restored``), until this subscription or its connection is closed. A broker
        away for ``gone_after_s`` on end raises BrokerUnavailable."""
        incoming: asyncio.Queue[Received | BrokerUnavailable | None] = asyncio.Queue()

        async def take(raw: aio_pika.abc.AbstractIncomingMessage) -> None:
            incoming.put_nowait(Received(raw.routing_key or "", raw.body))

        def end(*_: object) -> None:
            incoming.put_nowait(None)

        async def start() -> aio_pika.abc.ConsumerTag:
            while True:
                try:
                    tag = await self._queue.consume(take, no_ack=True)
                    self._tags.add(tag)
                    return tag
                except TRANSIENT:
                    # The connection is being restored (the queue is, too), or it has gone
                    # for good, which the watch says.
                    await asyncio.sleep(RETRY_S)

        if self._closed:
            return
        self._ends.add(end)
        starting = asyncio.create_task(start())
        watching = asyncio.create_task(self._watch(incoming.put_nowait, gone_after_s))
        try:
            while (message := await incoming.get()) is not None:
                if isinstance(message, BrokerUnavailable):
                    raise message
                yield message
        finally:
            self._ends.discard(end)
            watching.cancel()
            starting.cancel()
            await asyncio.gather(watching, starting, return_exceptions=True)
            tag = None if starting.cancelled() or starting.exception() else starting.result()
            if tag is not None and not self._channel.is_closed:
                with contextlib.suppress(*TRANSIENT):
                    await self._queue.cancel(tag)

    async def _watch(
        self, end_with: Callable[[BrokerUnavailable | None], None], gone_after_s: float
    ) -> None:
        """End ``messages()`` once the connection is closed, or has been away too long."""
        loop = asyncio.get_running_loop()
        away_since: float | None = None
        while True:
            await asyncio.sleep(WATCH_S)
            if self._connection.is_closed:
                end_with(None)
                return
            if not self._channel.is_closed:
                away_since = None
                continue
            away_since = loop.time() if away_since is None else away_since
            if loop.time() - away_since >= gone_after_s:
                end_with(
                    BrokerUnavailable(f"the broker connection has been lost for {gone_after_s:g} s")
                )
                return

    async def close(self) -> None:
        """Close its channel (the queue goes with it); ``messages()`` end. Idempotent.

        Closed also while the connection is away: a robust channel not closed is restored
        with the connection, its queue, bindings and consumer with it."""
        self._closed = True
        for end in list(self._ends):
            end()
        for task in list(self._recovering):
            task.cancel()
        with contextlib.suppress(*TRANSIENT):
            await self._channel.close()
