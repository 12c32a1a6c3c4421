"""The batching consumer: decode at the boundary, hand batches to a handler, ack after it.

Poison input is dead-lettered once with a reason and acked; the consumer goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import aio_pika.abc
from pamqp.common import Arguments

from schemas import SchemaError

from .connection import TRANSIENT
from .delivery import Delivery, settle
from .errors import BrokerUnavailable, HandlerUnavailable, MessageRejected
from .frames import unreadable
from .ports import DeadLetterer
from .topology import declare_consumed_queue

log = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class PayloadDecoder(Protocol[T_co]):
    """What a consumer decodes its payloads with (the contract's typed decoders, or raw)."""

    def decode(self, payload: bytes) -> T_co: ...


BatchHandler = Callable[[list[Delivery[T]]], Awaitable[None]]
#: Called for a message about to be dead-lettered: its body, the decoded message when it
#: decoded, and the reason (the intake answers the submitter with it).
PoisonHandler = Callable[[bytes, T | None, str], Awaitable[None]]


class Consumer(Generic[T]):
    """Consume one queue; decode at the boundary; hand batches to a handler; ack after it.

    Deliveries that arrive while the handler works are handled together next time, so that
    the batch grows with the load and a lone message waits for nothing. A payload that cannot
    be decoded is dead-lettered once with the reason and acked; the consumer goes on.
    If the handler raises ``HandlerUnavailable`` the batch is held and handed over again until
    what it writes to is back (in order, and without counting toward the delivery limit); any
    other error is narrowed down by handling the batch one message at a time, and a message
    that still fails is dead-lettered with the error as its reason.
    """

    def __init__(
        self,
        connection: aio_pika.abc.AbstractRobustConnection,
        queue: str,
        decoder: PayloadDecoder[T],
        handler: BatchHandler[T],
        publisher: DeadLetterer,
        prefetch: int = 256,
        max_batch: int = 256,
        queue_arguments: Arguments | None = None,
        on_poison: PoisonHandler[T] | None = None,
        dead_letters: bool = True,
        verify: Callable[[str | None, T], None] | None = None,
        check_sender: Callable[[str | None, T], None] | None = None,
    ) -> None:
        self.queue_name = queue
        self._on_poison = on_poison
        #: False for a consumer of dead letters itself: what it cannot handle is logged and
        #: dropped, never dead-lettered again into the exchange it reads from.
        self._dead_letters = dead_letters
        #: Checks a decoded message against its delivery (its routing key); raising
        #: MessageRejected makes it poison.
        self._verify = verify
        self._check_sender = check_sender
        self._queue_arguments = queue_arguments
        self._connection = connection
        self._decoder = decoder
        self._handler = handler
        self._publisher = publisher
        self._prefetch = prefetch
        self._max_batch = max_batch
        self._pending: list[aio_pika.abc.AbstractIncomingMessage] = []
        self._wake = asyncio.Event()
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None
        self._stopping = False
        #: A handled batch was left unacked: acks "up to and including" would take it too.
        self._left_unacked = False

    async def start(self) -> None:
        """Begin consuming (deliveries queue up until ``run`` handles them)."""
        try:
            self._channel = await self._connection.channel()
            await self._channel.set_qos(prefetch_count=self._prefetch)
            self._queue = await declare_consumed_queue(
                self._channel, self.queue_name, self._queue_arguments
            )
            self._tag = await self._queue.consume(self._on_message)
        except TRANSIENT as exc:
            raise BrokerUnavailable(f"cannot consume {self.queue_name}: {exc!r}") from exc

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._pending.append(message)
        self._wake.set()

    async def run(self) -> None:
        """Handle batches until ``stop``; returns once what had arrived is handled."""
        while True:
            if not self._pending:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._pending[: self._max_batch]
            del self._pending[: len(batch)]
            await self._handle(batch)

    async def stop(self) -> None:
        """Stop taking deliveries; ``run`` finishes what it holds and returns."""
        self._stopping = True
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(*TRANSIENT):
                await self._queue.cancel(self._tag)
            self._tag = None
        self._wake.set()

    async def close(self) -> None:
        """Close the channel; unacked deliveries go back to the queue. Idempotent."""
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*TRANSIENT):
                await self._channel.close()
        self._channel = None

    async def _handle(self, batch: list[aio_pika.abc.AbstractIncomingMessage]) -> None:
        good: list[Delivery[T]] = []
        for raw in batch:
            # A consumer of dead letters takes them in as they are (it records why).
            if self._dead_letters and (why := unreadable(raw)) is not None:
                await self._poison(raw, None, why)
                continue
            try:
                message = self._decoder.decode(raw.body)
                if self._verify is not None:
                    self._verify(raw.routing_key, message)
                if self._check_sender is not None:
                    self._check_sender(raw.user_id, message)
                good.append(Delivery(message, raw))
            except (SchemaError, MessageRejected) as exc:
                await self._poison(raw, None, str(exc))
            except Exception as exc:  # a decoder defect is still this message's problem
                await self._poison(raw, None, f"cannot decode: {type(exc).__name__}: {exc}")
        if not good:
            return
        try:
            if not await self._apply(good):
                self._left_unacked = True
                return
        except Exception as exc:
            if len(good) > 1:
                # Narrow the failure down: the other messages of the batch are applied.
                for delivery in good:
                    await self._handle_one(delivery)
                return
            log.exception("%s: handler failed; dead-lettering the message", self.queue_name)
            await self._poison(good[0].raw, good[0].message, f"handler error: {_describe(exc)}")
            return
        await self._ack(good)

    async def _ack(self, batch: list[Delivery[T]]) -> None:
        """Ack a handled batch: on each channel it came in, its last delivery "and every one
        before it".

        Every delivery before the batch was settled already (batches are handled in order,
        poison is acked where it is met), so this acks exactly the batch, in one frame and,
        on a quorum queue, in one log entry instead of one per message: that halves what the
        broker spends on a consumed message. Once a batch was left unacked (the consumer
        stopping with it in hand), each delivery is acked on its own.
        """
        if self._left_unacked:
            for delivery in batch:
                await settle(delivery.raw.ack())
            return
        last: dict[int, aio_pika.abc.AbstractIncomingMessage] = {}
        for delivery in batch:
            last[id(_channel_of(delivery.raw))] = delivery.raw
        for raw in last.values():
            await settle(raw.ack(multiple=True))

    async def _handle_one(self, delivery: Delivery[T]) -> None:
        try:
            if not await self._apply([delivery]):
                self._left_unacked = True
                return
        except Exception as exc:
            log.exception("%s: handler failed; dead-lettering the message", self.queue_name)
            await self._poison(delivery.raw, delivery.message, f"handler error: {_describe(exc)}")
            return
        await settle(delivery.raw.ack())

    async def _apply(self, batch: list[Delivery[T]]) -> bool:
        """Hand ``batch`` to the handler, waiting out an outage of what it writes to with the
        batch in hand.

        Requeueing instead would reorder the messages and count each return toward the
        queue's delivery limit, so that a long outage would dead-letter good events. False
        when the consumer stopped first: the batch, unacked, goes back with the channel.
        """
        delay = 0.5
        while True:
            try:
                await self._handler(batch)
                return True
            except HandlerUnavailable as exc:
                if self._stopping:
                    return False
                log.error(
                    "%s: store unavailable (%s); holding %d message(s), again in %.1f s",
                    self.queue_name,
                    exc,
                    len(batch),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _poison(
        self, raw: aio_pika.abc.AbstractIncomingMessage, message: T | None, reason: str
    ) -> None:
        """Dead-letter one message with its reason, tell ``on_poison``, ack it; go on."""
        verb = "dead-lettering" if self._dead_letters else "dropping"
        log.warning("%s: %s a message: %s", self.queue_name, verb, reason[:300])
        if self._on_poison is not None:
            try:
                await self._on_poison(raw.body, message, reason)
            except Exception:
                log.exception("%s: answering a refused message failed", self.queue_name)
        if self._dead_letters:
            await self._publisher.reject(raw, self.queue_name, reason)
        else:
            await settle(raw.ack())


def _channel_of(raw: aio_pika.abc.AbstractIncomingMessage) -> object:
    """The channel a delivery came in on; None once it is closed (the broker requeued what it
    held: acking is moot)."""
    try:
        return raw.channel
    except Exception:
        return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]
