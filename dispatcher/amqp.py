"""The broker adapter: aio-pika behind a few small functions and classes.

Everything that touches aio-pika lives here, so that the rest of the code sees typed messages,
``BrokerUnavailable`` and nothing of the driver. Used by the control plane, the monitor and the
agent alike (one distribution, one adapter).

- ``declare_topology`` declares every exchange and queue idempotently.
- ``Publisher`` publishes with publisher confirms and persistent delivery, retrying through a
  reconnect until a deadline.
- ``Consumer`` takes deliveries, decodes each once at the boundary, dead-letters poison input
  once with a reason, and hands batches of decoded messages to a handler; it acks only after
  the handler returned, that is after the effect is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions
from pamqp.common import Arguments

from schemas import Message, SchemaError, encode, kind_of
from schemas.topology import (
    AGENT_EVENTS,
    CONTROL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_QUEUE_HEADER,
    DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_WATCH_QUEUE,
    INSTRUCTIONS_EXCHANGE,
    LOCATION_EVENTS,
    LOCATIONS_EXCHANGE,
    REQUESTS_EXCHANGE,
    REQUESTS_QUEUE,
    REQUESTS_ROUTING_KEY,
    RUN_EVENTS,
    STATUS_EXCHANGE,
    STATUS_MONITOR_QUEUE,
    STATUS_STORE_QUEUE,
    control_queue,
    instructions_queue,
)

from . import metrics
from .errors import BrokerRefused, BrokerUnavailable, DispatcherError, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: Exceptions that mean "the connection or channel is gone; try again after a reconnect".
TRANSIENT = (
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.ChannelClosed,
    aio_pika.exceptions.ConnectionClosed,
    RuntimeError,  # aio-pika raises it for a publish on a closed channel
)
#: Exceptions that mean "the broker refused this one operation"; the connection is fine.
REFUSED = (
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelPreconditionFailed,
)
_QUORUM: Arguments = {"x-queue-type": "quorum"}


async def connect(
    url: str, name: str, timeout: float = 30.0
) -> aio_pika.abc.AbstractRobustConnection:
    """A connection that reconnects by itself and restores its channels and consumers."""
    try:
        return await aio_pika.connect_robust(
            url,
            timeout=timeout,
            reconnect_interval=1.0,
            client_properties={"connection_name": name},
        )
    except (*TRANSIENT, aiormq.exceptions.AMQPError) as exc:
        raise BrokerUnavailable(f"cannot connect to the broker: {exc!r}") from exc


async def declare_topology(
    channel: aio_pika.abc.AbstractChannel, agent_queues: Sequence[str] = ()
) -> None:
    """Declare every exchange and queue of the project; safe to call any number of times."""
    direct, topic, fanout = (
        aio_pika.ExchangeType.DIRECT,
        aio_pika.ExchangeType.TOPIC,
        aio_pika.ExchangeType.FANOUT,
    )
    dead = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, fanout, durable=True)
    dead_queue = await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True, arguments=_QUORUM)
    await dead_queue.bind(dead, routing_key="")

    requests = await channel.declare_exchange(REQUESTS_EXCHANGE, direct, durable=True)
    requests_queue = await channel.declare_queue(REQUESTS_QUEUE, durable=True, arguments=_QUORUM)
    await requests_queue.bind(requests, routing_key=REQUESTS_ROUTING_KEY)

    await channel.declare_exchange(INSTRUCTIONS_EXCHANGE, direct, durable=True)
    await channel.declare_exchange(CONTROL_EXCHANGE, direct, durable=True)
    await channel.declare_exchange(LOCATIONS_EXCHANGE, direct, durable=True)
    for agent_queue in agent_queues:
        await declare_instructions_queue(channel, agent_queue)

    status = await channel.declare_exchange(STATUS_EXCHANGE, topic, durable=True)
    # The failure monitor's queue is declared by the monitor itself: declared here, it would
    # fill up with heartbeats wherever no monitor runs.
    store_queue = await channel.declare_queue(STATUS_STORE_QUEUE, durable=True, arguments=_QUORUM)
    for pattern in (RUN_EVENTS, AGENT_EVENTS, LOCATION_EVENTS):
        await store_queue.bind(status, routing_key=pattern)
    # The control plane's own copy of every dead letter: counted, alerted on, and a dead
    # LaunchRun fails its run. The operators' queue above is bounded and only listed.
    watch = await channel.declare_queue(DEAD_LETTER_WATCH_QUEUE, durable=True, arguments=_QUORUM)
    await watch.bind(dead, routing_key="")


async def declare_instructions_queue(
    channel: aio_pika.abc.AbstractChannel, agent_queue: str
) -> aio_pika.abc.AbstractQueue:
    """Declare the quorum queue of one agent queue name and bind it."""
    exchange = await channel.get_exchange(INSTRUCTIONS_EXCHANGE, ensure=False)
    queue = await channel.declare_queue(
        instructions_queue(agent_queue), durable=True, arguments=_QUORUM
    )
    await queue.bind(exchange, routing_key=agent_queue)
    return queue


async def declare_target(channel: aio_pika.abc.AbstractChannel, exchange: str, key: str) -> None:
    """Make sure the queue an instruction is routed to exists before the first message for it,
    so that an agent started later (or coming back) finds its instructions waiting.

    Raises BrokerRefused when the broker refuses the name, BrokerUnavailable when it is gone.
    """
    try:
        if exchange == INSTRUCTIONS_EXCHANGE:
            await declare_instructions_queue(channel, key)
        elif exchange == CONTROL_EXCHANGE:
            await declare_control_queue(channel, key)
    except REFUSED as exc:
        raise BrokerRefused(f"the broker refused the queue for {exchange}/{key}: {exc}") from exc
    except (ValueError, *TRANSIENT) as exc:
        if isinstance(exc, ValueError):  # an unsafe name, refused before asking the broker
            raise BrokerRefused(str(exc)) from exc
        raise BrokerUnavailable(f"cannot declare the queue for {exchange}/{key}: {exc!r}") from exc


async def declare_control_queue(
    channel: aio_pika.abc.AbstractChannel, agent_id: str
) -> aio_pika.abc.AbstractQueue:
    """Declare one agent's control queue (TerminateRun for that agent only) and bind it.

    Instructions wait there while the agent is away, so that a returning agent is fenced.
    An agent id that never comes back leaves a queue that expires after a week unused.
    """
    exchange = await channel.declare_exchange(
        CONTROL_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queue = await channel.declare_queue(
        control_queue(agent_id),
        durable=True,
        arguments={"x-queue-type": "quorum", "x-expires": 7 * 24 * 3600 * 1000},
    )
    await queue.bind(exchange, routing_key=agent_id)
    return queue


#: The failure monitor's queue is bounded: with no monitor running, old heartbeats are
#: dropped rather than piling up.
MONITOR_QUEUE_ARGUMENTS: Arguments = {
    "x-queue-type": "quorum",
    "x-max-length": 100_000,
    "x-overflow": "drop-head",
}


async def declare_monitor_queue(channel: aio_pika.abc.AbstractChannel) -> None:
    """Declare the failure monitor's queue on the status exchange (the monitor does this)."""
    queue = await channel.declare_queue(
        STATUS_MONITOR_QUEUE, durable=True, arguments=MONITOR_QUEUE_ARGUMENTS
    )
    exchange = await channel.get_exchange(STATUS_EXCHANGE, ensure=False)
    # Heartbeats only: run events (output batches above all) would cost the monitor a decode
    # each, and push heartbeats out of its bounded queue when it lags.
    await queue.bind(exchange, routing_key=AGENT_EVENTS)
    for stale in (RUN_EVENTS, "run.*"):  # bindings of earlier versions
        await queue.unbind(exchange, routing_key=stale)


async def declare_consumed_queue(
    channel: aio_pika.abc.AbstractChannel, name: str, arguments: Arguments | None = None
) -> aio_pika.abc.AbstractQueue:
    """A queue of the topology, declared (not just looked up) on ``channel``.

    A robust channel restores after a reconnect only the queues declared on it, and with
    them their consumers; a queue merely looked up would silently lose its consumer.
    """
    return await channel.declare_queue(name, durable=True, arguments=arguments or _QUORUM)


class Publisher:
    """Publishes with confirms and persistent delivery on a channel of its own."""

    def __init__(
        self, connection: aio_pika.abc.AbstractRobustConnection, retry_deadline_s: float = 30.0
    ) -> None:
        self._connection = connection
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._lock = asyncio.Lock()
        self.retry_deadline_s = retry_deadline_s

    async def channel(self) -> aio_pika.abc.AbstractChannel:
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel(publisher_confirms=True)
                self._exchanges.clear()
            return self._channel

    async def _exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        channel = await self.channel()
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Message,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish one message and wait for the broker's confirm."""
        await self.publish_raw(
            exchange,
            routing_key,
            encode(message),
            headers=headers,
            message_id=str(message.message_id),
            kind=kind_of(message),
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
        """Publish bytes as they are (dead letters, tests); confirmed and persistent."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_deadline_s
        delay = 0.1
        while True:
            try:
                target = await self._exchange(exchange)
                await target.publish(
                    aio_pika.Message(
                        body,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=message_id,
                        type=kind,
                        headers=headers or {},
                    ),
                    routing_key=routing_key,
                )
                return
            except aio_pika.exceptions.DeliveryError as exc:
                raise BrokerRefused(f"the broker refused a publish to {exchange}: {exc}") from exc
            except REFUSED as exc:
                self._channel = None  # the broker closed the channel
                raise BrokerRefused(f"the broker refused a publish to {exchange}: {exc}") from exc
            except TRANSIENT as exc:
                if loop.time() + delay > deadline:
                    waited = self.retry_deadline_s
                    raise BrokerUnavailable(
                        f"publish to {exchange} not confirmed within {waited} s: {exc!r}"
                    ) from exc
                log.warning("publish to %s failed (%r); retrying in %.1f s", exchange, exc, delay)
                self._channel = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def dead_letter(
        self, message: aio_pika.abc.AbstractIncomingMessage, queue: str, reason: str
    ) -> None:
        """Send a poison message to the dead-letter queue with its reason; confirmed.

        Only our two headers travel with it: the sender's own headers could be anything (an
        attacker's ``x-hd-reason``, a table too large for a frame), and a dead letter must
        always be publishable.
        """
        metrics.DEAD_LETTERED.labels(queue).inc()
        headers: dict[str, Any] = {
            DEAD_LETTER_REASON_HEADER: reason[:1000],
            DEAD_LETTER_QUEUE_HEADER: queue,
        }
        await self.publish_raw(
            DEAD_LETTER_EXCHANGE,
            queue,
            message.body,
            headers=headers,
            message_id=message.message_id,
        )

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        self._channel = None


@dataclass(frozen=True)
class DeadLetter:
    """A message in the dead-letter queue, as an operator sees it."""

    source_queue: str
    reason: str
    message_id: str | None
    body: bytes


async def peek_dead_letters(
    connection: aio_pika.abc.AbstractConnection, limit: int
) -> list[DeadLetter]:
    """Up to ``limit`` dead letters, oldest first, left in the queue."""
    channel = await connection.channel()
    try:
        queue = await declare_consumed_queue(channel, DEAD_LETTER_QUEUE)
        found: list[DeadLetter] = []
        # Taken without acking, then all returned at once: nothing is lost or reordered.
        while len(found) < limit:
            message = await queue.get(no_ack=False, fail=False, timeout=5)
            if message is None:
                break
            headers = message.headers or {}
            found.append(
                DeadLetter(
                    str(headers.get(DEAD_LETTER_QUEUE_HEADER, "?")),
                    str(headers.get(DEAD_LETTER_REASON_HEADER, "")),
                    message.message_id,
                    message.body,
                )
            )
        return found
    except TRANSIENT as exc:
        raise BrokerUnavailable(f"cannot read the dead-letter queue: {exc!r}") from exc
    finally:
        with contextlib.suppress(*TRANSIENT):
            await channel.close()  # unacked messages go back to the queue, in order


@dataclass(frozen=True)
class Delivery(Generic[T]):
    """A decoded message and the delivery it came in (for ack, nack and redelivery checks)."""

    message: T
    raw: aio_pika.abc.AbstractIncomingMessage


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
    If the handler raises ``StoreUnavailable`` the batch is held and handed over again until
    the store is back (in order, and without counting toward the delivery limit); any other
    error is narrowed down by handling the batch one message at a time, and a message that
    still fails is dead-lettered with the error as its reason.
    """

    def __init__(
        self,
        connection: aio_pika.abc.AbstractRobustConnection,
        queue: str,
        decoder: PayloadDecoder[T],
        handler: BatchHandler[T],
        publisher: Publisher,
        prefetch: int = 256,
        max_batch: int = 256,
        queue_arguments: Arguments | None = None,
        on_poison: PoisonHandler[T] | None = None,
        dead_letters: bool = True,
        verify: Callable[[str | None, T], None] | None = None,
    ) -> None:
        self.queue_name = queue
        self._on_poison = on_poison
        #: False for a consumer of dead letters itself: what it cannot handle is logged and
        #: dropped, never dead-lettered again into the exchange it reads from.
        self._dead_letters = dead_letters
        #: Checks a decoded message against its delivery (its routing key); raising a
        #: DispatcherError makes it poison.
        self._verify = verify
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
            try:
                message = self._decoder.decode(raw.body)
                if self._verify is not None:
                    self._verify(raw.routing_key, message)
                good.append(Delivery(message, raw))
            except (SchemaError, DispatcherError) as exc:
                await self._poison(raw, None, str(exc))
            except Exception as exc:  # a decoder defect is still this message's problem
                await self._poison(raw, None, f"cannot decode: {type(exc).__name__}: {exc}")
        if not good:
            return
        try:
            if not await self._apply(good):
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
        for delivery in good:
            await settle(delivery.raw.ack())

    async def _handle_one(self, delivery: Delivery[T]) -> None:
        try:
            if not await self._apply([delivery]):
                return
        except Exception as exc:
            log.exception("%s: handler failed; dead-lettering the message", self.queue_name)
            await self._poison(delivery.raw, delivery.message, f"handler error: {_describe(exc)}")
            return
        await settle(delivery.raw.ack())

    async def _apply(self, batch: list[Delivery[T]]) -> bool:
        """Hand ``batch`` to the handler, waiting out a store outage with the batch in hand.

        Requeueing instead would reorder the messages and count each return toward the
        queue's delivery limit, so that a long outage would dead-letter good events. False
        when the consumer stopped first: the batch, unacked, goes back with the channel.
        """
        delay = 0.5
        while True:
            try:
                await self._handler(batch)
                return True
            except StoreUnavailable as exc:
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
            try:
                await self._publisher.dead_letter(raw, self.queue_name, reason)
            except BrokerRefused as exc:
                # Kept, it would come back for ever: it is logged, and it goes.
                log.error(
                    "%s: a dead letter was refused (%s); message dropped", self.queue_name, exc
                )
        await settle(raw.ack())


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


async def settle(operation: Awaitable[None]) -> None:
    """Ack or nack; a delivery from a channel that has since closed is requeued by the broker."""
    try:
        await operation
    except TRANSIENT as exc:
        log.debug("could not settle a delivery (%r); the broker will redeliver it", exc)
