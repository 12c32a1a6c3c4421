"""An in-memory broker: ``FakeBroker`` (a connection: channels, exchanges, queues) and
``FakeDelivery`` (``transport.ports.InboundDelivery``); ``publisher.FakePublisher`` publishes
into it.

A model, not canned answers: exchanges route (direct, topic, fanout; the default exchange by
queue name), queues hold messages, consumers get at most their prefetch of unacked deliveries,
a delivery is settled once, what a closed channel held unacked goes back to its queue marked
redelivered, a publish to a missing exchange is refused and closes the channel. Errors are
the driver's own (aiormq / aio-pika), so that the transport translates them as it does for
RabbitMQ. ``tests/contracts/broker_contract.py`` holds this and the real broker to the same
behaviour.

Not modelled: durability, quorum queues' delivery counts and limits, policies, TTLs,
exclusive queues' ownership, timing (a publish is routed at once).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import types
import uuid
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from transport.ports import InboundDelivery

Callback = Callable[["FakeDelivery"], Awaitable[Any]]


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: words split on '.', '*' one word, '#' zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split(".") if key else [])


@dataclass
class Stored:
    """A message in a queue."""

    body: bytes
    routing_key: str
    exchange: str
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    type: str | None = None
    delivery_mode: int = 1
    redelivered: bool = False
    user_id: str | None = None


class FakeDelivery:
    """A delivery (``transport.ports.InboundDelivery``): ack, nack or reject it once.

    Without a channel (``FakeDelivery(body)``) it stands alone and only records how it was
    settled; from a ``FakeBroker`` queue it also goes back to the queue or leaves it.
    """

    def __init__(
        self,
        body: bytes,
        *,
        routing_key: str = "",
        exchange: str = "",
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        type: str | None = None,
        delivery_mode: int = 1,
        redelivered: bool = False,
        user_id: str | None = None,
        channel: FakeChannel | None = None,
        consumer: Consumer | None = None,
        no_ack: bool = False,
    ) -> None:
        self.body = body
        self.routing_key = routing_key
        self.exchange = exchange
        self.headers = headers or {}
        self.message_id = message_id
        self.type = type
        self.delivery_mode = delivery_mode
        self.redelivered = redelivered
        self.user_id = user_id
        #: How it was settled, in order: "ack", "nack(requeue=True)", "reject(requeue=False)".
        self.settlements: list[str] = []
        self._channel = channel
        self._consumer = consumer
        self._no_ack = no_ack
        self._processed = False

    @classmethod
    def of(cls, stored: Stored, **kwargs: Any) -> FakeDelivery:
        return cls(
            stored.body,
            routing_key=stored.routing_key,
            exchange=stored.exchange,
            headers=dict(stored.headers),
            message_id=stored.message_id,
            type=stored.type,
            delivery_mode=stored.delivery_mode,
            redelivered=stored.redelivered,
            user_id=stored.user_id,
            **kwargs,
        )

    @property
    def processed(self) -> bool:
        return self._processed

    @property
    def channel(self) -> FakeChannel:
        if self._channel is None or self._channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
        return self._channel

    async def ack(self, multiple: bool = False) -> None:
        """``multiple``: and every delivery of the channel before it still unsettled."""
        if self._channel is not None:
            self._channel.acks_sent += 1
        if multiple and self._channel is not None and not self._channel.is_closed:
            for earlier in self._channel.unsettled_before(self):
                earlier._settle("ack", requeue=False)
        self._settle("ack", requeue=False)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self._settle(f"nack(requeue={requeue})", requeue=requeue)

    async def reject(self, requeue: bool = False) -> None:
        self._settle(f"reject(requeue={requeue})", requeue=requeue)

    def _settle(self, how: str, requeue: bool) -> None:
        if self._no_ack:
            raise TypeError('Can\'t settle a message with "no_ack" flag')
        if self._processed:
            raise aio_pika.exceptions.MessageProcessError("Message already processed", self)
        if self._channel is not None and self._channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
        self._processed = True
        self.settlements.append(how)
        if self._channel is not None:
            self._channel.settled(self, requeue)

    def stored(self) -> Stored:
        return Stored(
            self.body,
            self.routing_key,
            self.exchange,
            dict(self.headers),
            self.message_id,
            self.type,
            self.delivery_mode,
            redelivered=True,
        )


@dataclass
class Consumer:
    tag: str
    channel: FakeChannel
    callback: Callback
    prefetch: int
    no_ack: bool
    unacked: int = 0

    def has_room(self) -> bool:
        return self.no_ack or self.prefetch == 0 or self.unacked < self.prefetch


class QueueState:
    """A queue on the broker: messages ready, consumers, and how many deliveries are out."""

    def __init__(self, broker: FakeBroker, name: str, arguments: dict[str, Any]) -> None:
        self.broker = broker
        self.name = name
        self.arguments = arguments
        self.ready: collections.deque[Stored] = collections.deque()
        self.consumers: list[Consumer] = []
        self.unacked = 0
        self._turn = 0

    def put_body(self, body: bytes, **properties: Any) -> None:
        """A message published straight to this queue (the default exchange)."""
        self.put(Stored(body, self.name, "", **properties))

    def put(self, stored: Stored, front: bool = False) -> None:
        (self.ready.appendleft if front else self.ready.append)(stored)
        self.dispatch()

    def dispatch(self) -> None:
        """Hand ready messages to consumers with room, in turn, each callback in a task (as
        aio-pika does)."""
        while self.ready:
            open_ = [c for c in self.consumers if c.has_room() and not c.channel.is_closed]
            if not open_:
                return
            consumer = open_[self._turn % len(open_)]
            self._turn += 1
            stored = self.ready.popleft()
            delivery = FakeDelivery.of(
                stored, channel=consumer.channel, consumer=consumer, no_ack=consumer.no_ack
            )
            if not consumer.no_ack:
                consumer.unacked += 1
                self.unacked += 1
                consumer.channel.unacked[id(delivery)] = (self, delivery)
            self.broker.spawn(consumer.callback(delivery))


class FakeExchange:
    """An exchange handle (as ``channel.get_exchange(name, ensure=False)`` gives one)."""

    def __init__(self, channel: FakeChannel, name: str) -> None:
        self.channel = channel
        self.name = name

    async def publish(
        self, message: aio_pika.abc.AbstractMessage, routing_key: str, **_: Any
    ) -> None:
        """Route ``message``; a missing exchange closes the channel, as RabbitMQ does."""
        await asyncio.sleep(0)
        self.channel.check_open()
        broker = self.channel.broker
        if self.name and self.name not in broker.exchanges:
            self.channel.close_by_broker()
            raise aiormq.exceptions.ChannelNotFoundEntity(
                f"NOT_FOUND - no exchange '{self.name}' in vhost '/'"
            )
        stored = Stored(
            message.body,
            routing_key,
            self.name,
            dict(message.headers or {}),
            message.message_id,
            message.type,
            int(message.delivery_mode or 1),
            user_id=message.user_id,
        )
        for queue in broker.route(self.name, routing_key):
            queue.put(Stored(**{**stored.__dict__, "headers": dict(stored.headers)}))

    async def delete(self, if_unused: bool = False) -> None:
        self.channel.broker.delete_exchange(self.name)


class FakeQueue:
    """A queue handle on one channel (``channel.declare_queue`` gives one)."""

    def __init__(self, channel: FakeChannel, state: QueueState) -> None:
        self.channel = channel
        self.state = state
        self.name = state.name

    @property
    def declaration_result(self) -> Any:
        """What the broker answered the declaration with: messages ready, consumers."""
        return types.SimpleNamespace(
            message_count=len(self.state.ready), consumer_count=len(self.state.consumers)
        )

    async def bind(self, exchange: FakeExchange | str, routing_key: str | None = None) -> None:
        name = exchange if isinstance(exchange, str) else exchange.name
        if name not in self.channel.broker.exchanges:
            self.channel.close_by_broker()
            raise aiormq.exceptions.ChannelNotFoundEntity(f"NOT_FOUND - no exchange '{name}'")
        self.channel.broker.exchanges[name].add((self.name, routing_key or ""))

    async def unbind(self, exchange: FakeExchange | str, routing_key: str | None = None) -> None:
        name = exchange if isinstance(exchange, str) else exchange.name
        self.channel.broker.exchanges.get(name, set()).discard((self.name, routing_key or ""))

    async def consume(self, callback: Callback, no_ack: bool = False, **_: Any) -> str:
        self.channel.check_open()
        consumer = Consumer(
            f"ctag-{next(_counter)}", self.channel, callback, self.channel.prefetch, no_ack
        )
        self.state.consumers.append(consumer)
        self.state.dispatch()
        return consumer.tag

    async def cancel(self, consumer_tag: str, **_: Any) -> None:
        self.state.consumers = [c for c in self.state.consumers if c.tag != consumer_tag]

    async def get(self, *, no_ack: bool = False, fail: bool = True, **_: Any) -> Any:
        self.channel.check_open()
        if not self.state.ready:
            if fail:
                raise aio_pika.exceptions.QueueEmpty()
            return None
        delivery = FakeDelivery.of(self.state.ready.popleft(), channel=self.channel, no_ack=no_ack)
        if not no_ack:
            self.state.unacked += 1
            self.channel.unacked[id(delivery)] = (self.state, delivery)
        return delivery


class FakeChannel:
    """A channel: awaitable and an async context manager, like a robust connection's."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.is_closed = False
        self.prefetch = 0
        self.unacked: dict[int, tuple[QueueState, FakeDelivery]] = {}
        #: How many acks were sent on it (one "multiple" ack counts once).
        self.acks_sent = 0

    def __await__(self) -> Generator[Any, None, FakeChannel]:
        yield from asyncio.sleep(0).__await__()
        return self

    async def __aenter__(self) -> FakeChannel:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def check_open(self) -> None:
        if self.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")

    async def set_qos(self, prefetch_count: int = 0, **_: Any) -> None:
        """Per consumer, for consumers created after it (as with quorum queues)."""
        self.check_open()
        self.prefetch = prefetch_count

    async def declare_exchange(
        self, name: str, type: Any = "direct", durable: bool = False, **_: Any
    ) -> FakeExchange:
        self.check_open()
        kind = str(getattr(type, "value", type))
        if self.broker.kinds.get(name, kind) != kind:
            self.close_by_broker()
            raise aiormq.exceptions.ChannelPreconditionFailed(
                f"PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{name}'"
            )
        self.broker.exchanges.setdefault(name, set())
        self.broker.kinds[name] = kind
        return FakeExchange(self, name)

    async def get_exchange(self, name: str, ensure: bool = True) -> FakeExchange:
        self.check_open()
        if ensure and name not in self.broker.exchanges:
            self.close_by_broker()
            raise aiormq.exceptions.ChannelNotFoundEntity(f"NOT_FOUND - no exchange '{name}'")
        return FakeExchange(self, name)

    async def exchange_delete(self, exchange_name: str, **_: Any) -> None:
        self.check_open()
        self.broker.delete_exchange(exchange_name)

    @property
    def default_exchange(self) -> FakeExchange:
        return FakeExchange(self, "")

    async def declare_queue(
        self,
        name: str | None = None,
        *,
        arguments: dict[str, Any] | None = None,
        passive: bool = False,
        **_: Any,
    ) -> FakeQueue:
        """Declare (idempotently); different arguments for an existing queue are refused.
        ``passive``: only look it up (refused when it does not exist)."""
        self.check_open()
        name = name or f"amq.gen-{uuid.uuid4().hex}"
        arguments = dict(arguments or {})
        state = self.broker.queues.get(name)
        if passive:
            if state is None:
                self.close_by_broker()
                raise aiormq.exceptions.ChannelNotFoundEntity(f"NOT_FOUND - no queue '{name}'")
            return FakeQueue(self, state)
        if state is None:
            state = self.broker.queues[name] = QueueState(self.broker, name, arguments)
        elif state.arguments != arguments:
            self.close_by_broker()
            raise aiormq.exceptions.ChannelPreconditionFailed(
                f"PRECONDITION_FAILED - inequivalent arguments for queue '{name}'"
            )
        return FakeQueue(self, state)

    def unsettled_before(self, delivery: FakeDelivery) -> list[FakeDelivery]:
        """The deliveries of this channel still unsettled that came before ``delivery``."""
        earlier = []
        for key, (_, held) in self.unacked.items():
            if key == id(delivery):
                return earlier
            earlier.append(held)
        return []

    def settled(self, delivery: FakeDelivery, requeue: bool) -> None:
        queue, _ = self.unacked.pop(id(delivery))
        queue.unacked -= 1
        if delivery._consumer is not None:
            delivery._consumer.unacked -= 1
        if requeue:
            queue.put(delivery.stored(), front=True)
        queue.dispatch()

    def close_by_broker(self) -> None:
        """The broker closed the channel (a refused operation): what it held goes back."""
        self.is_closed = True
        for queue in self.broker.queues.values():
            queue.consumers = [c for c in queue.consumers if c.channel is not self]
        held, self.unacked = list(self.unacked.values()), {}
        for queue, delivery in reversed(held):
            queue.unacked -= 1
            queue.put(delivery.stored(), front=True)

    async def close(self) -> None:
        if not self.is_closed:
            self.close_by_broker()


_counter = itertools.count()


class FakeBroker:
    """The broker and one connection to it (``transport`` takes it where it takes aio-pika's
    robust connection)."""

    def __init__(self) -> None:
        #: Exchange name -> bindings (queue name, routing key); "" is the default exchange.
        self.exchanges: dict[str, set[tuple[str, str]]] = {}
        self.kinds: dict[str, str] = {}
        self.queues: dict[str, QueueState] = {}
        self.channels: list[FakeChannel] = []
        self.is_closed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def channel(self, publisher_confirms: bool = True, **_: Any) -> FakeChannel:
        channel = FakeChannel(self)
        self.channels.append(channel)
        return channel

    def unacked_of(self, queue: str) -> list[FakeDelivery]:
        """Deliveries of ``queue`` handed out and not settled yet, in order, on open channels."""
        return [
            delivery
            for channel in self.channels
            for state, delivery in channel.unacked.values()
            if state.name == queue
        ]

    async def close(self) -> None:
        self.is_closed = True

    def spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def delete_exchange(self, name: str) -> None:
        self.exchanges.pop(name, None)
        self.kinds.pop(name, None)

    def route(self, exchange: str, routing_key: str) -> list[QueueState]:
        if exchange == "":
            queue = self.queues.get(routing_key)
            return [queue] if queue is not None else []
        matched: dict[str, QueueState] = {}
        for queue_name, pattern in self.exchanges.get(exchange, set()):
            queue = self.queues.get(queue_name)
            if queue is None or queue_name in matched:
                continue
            kind = self.kinds.get(exchange, "direct")
            if (
                kind == "fanout"
                or (kind == "topic" and topic_matches(pattern, routing_key))
                or pattern == routing_key
            ):
                matched[queue_name] = queue
        return list(matched.values())

    def queue(self, name: str) -> QueueState:
        return self.queues[name]


if TYPE_CHECKING:

    def _a_port(fake: FakeDelivery) -> InboundDelivery:
        return fake  # mypy: the fake is an InboundDelivery
