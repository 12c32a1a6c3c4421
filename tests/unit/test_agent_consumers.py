"""Every consumer of the agent survives every message: poison is dead-lettered once, acked."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from schemas import LaunchRun, LocationSnapshot, LocationSpec, TerminateRun, encode
from schemas.topology import CONTROL_EXCHANGE, INSTRUCTIONS_EXCHANGE
from transport.delivery import Delivery
from transport.errors import BrokerRefused, BrokerUnavailable
from transport.instructions import InstructionConsumer
from transport.publisher import Publisher
from worker_agent.locations import LocationKeeper

pytestmark = pytest.mark.unit


@dataclass
class Raw:
    """An incoming delivery: its body, how it was published, and how it was settled."""

    body: bytes
    exchange: str = INSTRUCTIONS_EXCHANGE
    routing_key: str = "default"
    message_id: str | None = None
    user_id: str | None = None
    settled: list[str] = field(default_factory=list)

    @property
    def processed(self) -> bool:
        return bool(self.settled)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack(requeue={requeue})")


@dataclass
class DeadLetters:
    """The publisher's side the consumers use: what was dead-lettered, from where, and why;
    ``failure`` makes every dead letter fail as the broker would."""

    sent: list[tuple[bytes, str, str]] = field(default_factory=list)
    published: list[object] = field(default_factory=list)
    failure: Exception | None = None

    async def dead_letter(self, raw: Raw, queue: str, reason: str) -> None:
        if self.failure is not None:
            raise self.failure
        self.sent.append((raw.body, queue, reason))

    async def publish(self, exchange: str, routing_key: str, message: object) -> None:
        self.published.append(message)

    # The real one: dead-letter, and ack whatever became of the dead letter.
    reject = Publisher.reject


Callback = Callable[[Raw], Awaitable[None]]
_tags = itertools.count()


@dataclass
class Queue:
    """A queue on the fake broker: its name and the callbacks consuming it."""

    name: str
    consumers: dict[str, Callback] = field(default_factory=dict)

    async def bind(self, exchange: object, routing_key: str = "") -> None:
        pass

    async def consume(self, callback: Callback) -> str:
        tag = f"ctag-{next(_tags)}"
        self.consumers[tag] = callback
        return tag

    async def cancel(self, tag: str) -> None:
        self.consumers.pop(tag, None)

    async def deliver(self, raw: Raw) -> None:
        """Hand ``raw`` to this queue's consumer, as the broker would."""
        [callback] = self.consumers.values()
        await callback(raw)


@dataclass
class Broker:
    """Just enough of a robust connection and its channels for the agent's consumers."""

    queues: dict[str, Queue] = field(default_factory=dict)
    is_closed: bool = False

    async def channel(self) -> Broker:
        return self

    async def get_exchange(self, name: str, ensure: bool = True) -> str:
        return name

    async def declare_exchange(self, name: str, *args: object, **kwargs: object) -> str:
        return name

    async def declare_queue(self, name: str | None = None, **kwargs: object) -> Queue:
        name = name or f"amq.gen-{len(self.queues)}"
        return self.queues.setdefault(name, Queue(name))

    async def set_qos(self, prefetch_count: int) -> None:
        pass

    async def close(self) -> None:
        self.is_closed = True


def launch() -> LaunchRun:
    return LaunchRun(run_id=uuid.uuid4(), attempt=1, image="busybox")


INSTRUCTIONS = "hd.instructions.default"
CONTROL = "hd.control.a1"


async def consumer(
    handler: Any,
    dead: DeadLetters,
    broker: Broker | None = None,
    senders: frozenset[str] = frozenset(),
) -> InstructionConsumer:
    """An instruction consumer of agent a1 on queue default, started on ``broker``."""
    connection: Any = broker or Broker()
    publisher: Any = dead
    target = InstructionConsumer(
        connection, ("default",), publisher, handler, lambda: 1, "a1", senders=senders
    )
    await target.start()
    return target


async def deliver(target: InstructionConsumer, broker: Broker, queue: str, raw: Raw) -> None:
    await broker.queues[queue].deliver(raw)
    await target.drain(5)


async def test_an_undecodable_instruction_is_dead_lettered_once_and_acked() -> None:
    dead, broker = DeadLetters(), Broker()
    handled: list[object] = []

    async def handler(delivery: Delivery[Any]) -> None:
        handled.append(delivery.message)

    target = await consumer(handler, dead, broker)
    raw = Raw(b'{"kind": "LaunchRun", "nonsense": true}')
    await deliver(target, broker, INSTRUCTIONS, raw)
    assert raw.settled == ["ack"]
    assert handled == []
    [(body, queue, reason)] = dead.sent
    assert (body, queue) == (raw.body, INSTRUCTIONS)
    assert "invalid message" in reason


@pytest.mark.parametrize("error", [ValueError("bad"), KeyError("k"), RuntimeError("boom")])
async def test_any_handler_error_dead_letters_the_instruction_and_the_consumer_goes_on(
    error: Exception,
) -> None:
    dead, broker = DeadLetters(), Broker()
    handled: list[object] = []

    async def handler(delivery: Delivery[Any]) -> None:
        handled.append(delivery.message)
        if len(handled) == 1:
            raise error
        await delivery.raw.ack()

    target = await consumer(handler, dead, broker)
    first, second = Raw(encode(launch())), Raw(encode(launch()))
    await deliver(target, broker, INSTRUCTIONS, first)
    await deliver(target, broker, INSTRUCTIONS, second)
    assert first.settled == ["ack"]
    assert second.settled == ["ack"]
    [(_, queue, reason)] = dead.sent
    assert queue == INSTRUCTIONS
    assert type(error).__name__ in reason


async def test_a_control_instruction_is_dead_lettered_from_the_control_queue() -> None:
    dead, broker = DeadLetters(), Broker()

    async def handler(delivery: Delivery[Any]) -> None:
        raise RuntimeError("defect")

    target = await consumer(handler, dead, broker)
    terminate = TerminateRun(run_id=uuid.uuid4(), attempt=1)
    raw = Raw(encode(terminate), exchange=CONTROL_EXCHANGE, routing_key="a1")
    await deliver(target, broker, CONTROL, raw)
    assert raw.settled == ["ack"]
    assert [queue for _, queue, _ in dead.sent] == [CONTROL]


@pytest.mark.parametrize(
    ("queue", "exchange", "routing_key"),
    [
        # The management UI's "publish to queue", or a shovel: the default exchange.
        (INSTRUCTIONS, "", INSTRUCTIONS),
        (CONTROL, "", CONTROL),
        (INSTRUCTIONS, INSTRUCTIONS_EXCHANGE, ""),
        (INSTRUCTIONS, INSTRUCTIONS_EXCHANGE, "k" * 65),
        (CONTROL, CONTROL_EXCHANGE, "not.an.agent"),
    ],
)
async def test_poison_is_dead_lettered_from_the_queue_consumed_whatever_its_routing_key(
    queue: str, exchange: str, routing_key: str
) -> None:
    dead, broker = DeadLetters(), Broker()

    async def handler(delivery: Delivery[Any]) -> None:
        raise RuntimeError("defect")

    target = await consumer(handler, dead, broker)
    for body in (b"not json", encode(launch())):
        raw = Raw(body, exchange=exchange, routing_key=routing_key)
        await deliver(target, broker, queue, raw)
        assert raw.settled == ["ack"]
    assert [source for _, source, _ in dead.sent] == [queue, queue]


@pytest.mark.parametrize(
    "failure", [BrokerRefused("no such exchange"), BrokerUnavailable("gone"), RuntimeError("bug")]
)
async def test_an_instruction_that_cannot_be_dead_lettered_is_acked_anyway(
    failure: Exception,
) -> None:
    dead, broker = DeadLetters(failure=failure), Broker()
    handled: list[object] = []

    async def handler(delivery: Delivery[Any]) -> None:
        handled.append(delivery.message)
        await delivery.raw.ack()

    target = await consumer(handler, dead, broker)
    poison, good = Raw(b"not json"), Raw(encode(launch()))
    await deliver(target, broker, INSTRUCTIONS, poison)
    await deliver(target, broker, INSTRUCTIONS, good)
    assert poison.settled == ["ack"]
    assert good.settled == ["ack"]
    assert len(handled) == 1


async def test_an_error_after_the_handler_settled_the_instruction_is_not_dead_lettered() -> None:
    dead, broker = DeadLetters(), Broker()

    async def handler(delivery: Delivery[Any]) -> None:
        await delivery.raw.ack()
        raise RuntimeError("late defect")

    target = await consumer(handler, dead, broker)
    raw = Raw(encode(launch()))
    await deliver(target, broker, INSTRUCTIONS, raw)
    assert raw.settled == ["ack"]
    assert dead.sent == []


async def keeper(
    dead: DeadLetters, broker: Broker, senders: frozenset[str] = frozenset()
) -> tuple[LocationKeeper, Queue]:
    """A location keeper of agent a1 on queue default, started, and its snapshot queue."""
    servers: Any = None
    connection: Any = broker
    publisher: Any = dead
    target = LocationKeeper(servers, connection, publisher, "a1", ("default",), senders=senders)
    await target.start()
    [queue] = broker.queues.values()
    return target, queue


async def test_a_poison_location_snapshot_is_dead_lettered_from_the_keepers_queue() -> None:
    dead, broker = DeadLetters(), Broker()
    _, queue = await keeper(dead, broker)
    raw = Raw(b"\xff not json", exchange="", routing_key="")
    await queue.deliver(raw)
    assert raw.settled == ["ack"]
    [(_, source, reason)] = dead.sent
    assert source == queue.name
    assert "location snapshot refused" in reason


@pytest.mark.parametrize(
    "failure", [BrokerRefused("no such exchange"), BrokerUnavailable("gone"), RuntimeError("bug")]
)
async def test_a_location_snapshot_that_cannot_be_dead_lettered_is_acked_anyway(
    failure: Exception,
) -> None:
    dead, broker = DeadLetters(failure=failure), Broker()
    _, queue = await keeper(dead, broker)
    raw = Raw(b"\xff not json")
    await queue.deliver(raw)
    assert raw.settled == ["ack"]


async def test_a_location_snapshot_is_taken_in_and_acked() -> None:
    dead, broker = DeadLetters(), Broker()
    target, queue = await keeper(dead, broker)
    spec = LocationSpec(name="loc", image="busybox")
    raw = Raw(encode(LocationSnapshot(queue="default", locations=(spec,))))
    await queue.deliver(raw)
    assert raw.settled == ["ack"]
    assert dead.sent == []
    assert target._snapshots == {"default": (spec,)}


async def test_a_snapshot_older_than_the_one_kept_is_ignored() -> None:
    dead, broker = DeadLetters(), Broker()
    target, queue = await keeper(dead, broker)
    old, new = LocationSpec(name="old", image="busybox"), LocationSpec(name="new", image="busybox")
    for revision, spec in ((7, new), (6, old)):
        raw = Raw(encode(LocationSnapshot(queue="default", locations=(spec,), revision=revision)))
        await queue.deliver(raw)
        assert raw.settled == ["ack"]
    assert target._snapshots == {"default": (new,)}
    # A newer one, and one from a control plane that does not number them, are taken.
    for revision, spec in ((8, old), (0, new)):
        await queue.deliver(
            Raw(encode(LocationSnapshot(queue="default", locations=(spec,), revision=revision)))
        )
        assert target._snapshots == {"default": (spec,)}
    assert dead.sent == []


@pytest.mark.parametrize("revision", ["-1", str(2**63), "1.5", '"7"', "null"])
async def test_a_snapshot_with_a_hostile_revision_is_dead_lettered(revision: str) -> None:
    dead, broker = DeadLetters(), Broker()
    target, queue = await keeper(dead, broker)
    body = encode(LocationSnapshot(queue="default", revision=3))
    raw = Raw(body.replace(b'"revision":3', b'"revision":' + revision.encode()))
    assert raw.body != body
    await queue.deliver(raw)
    assert raw.settled == ["ack"] and target._snapshots == {}
    [(_, _, reason)] = dead.sent
    assert "location snapshot refused" in reason and "revision" in reason


async def test_instructions_and_snapshots_from_another_broker_user_are_dead_lettered() -> None:
    dead, broker = DeadLetters(), Broker()
    handled: list[object] = []

    async def handler(delivery: Delivery[Any]) -> None:
        handled.append(delivery.message)
        await delivery.raw.ack()

    target = await consumer(handler, dead, broker, senders=frozenset({"control-plane"}))
    trusted = Raw(encode(launch()), user_id="control-plane")
    forged = Raw(encode(launch()), user_id="agent-7")
    unsigned = Raw(encode(launch()))
    for raw in (trusted, forged, unsigned):
        await deliver(target, broker, INSTRUCTIONS, raw)
        assert raw.settled == ["ack"]
    assert len(handled) == 1
    reasons = [reason for _, _, reason in dead.sent]
    assert reasons == [
        "published by broker user 'agent-7', not by the control plane (control-plane)",
        "published by no broker user (no user_id), not by the control plane (control-plane)",
    ]

    dead, broker = DeadLetters(), Broker()
    kept, queue = await keeper(dead, broker, senders=frozenset({"control-plane"}))
    spec = LocationSpec(name="loc", image="evil/image")
    snapshot = encode(LocationSnapshot(queue="default", locations=(spec,)))
    forged = Raw(snapshot, user_id="agent-7")
    await queue.deliver(forged)
    assert forged.settled == ["ack"] and kept._snapshots == {}
    [(_, _, reason)] = dead.sent
    assert "published by broker user 'agent-7', not by the control plane" in reason
    await queue.deliver(Raw(snapshot, user_id="control-plane"))
    assert kept._snapshots == {"default": (spec,)}


async def test_a_prefetch_change_the_broker_interrupted_is_applied_once_it_is_back() -> None:
    """The consumers are cancelled before the new prefetch is set: with the broker away at
    that moment, none was left, no reconnect restores a cancelled one, and an idle agent's
    free slots would not change again. The change is tried again until it holds."""
    import asyncio

    import aiormq.exceptions

    from tests.fakes.broker import FakeBroker
    from tests.fakes.clock import until
    from transport.topology import declare_topology

    broker = FakeBroker()
    await declare_topology(broker.channel())
    free = [2]

    async def handler(delivery: Delivery[Any]) -> None:
        await delivery.raw.ack()

    target = InstructionConsumer(broker, ("default",), None, handler, lambda: free[0], "a1")  # type: ignore[arg-type]
    await target.start()
    running = asyncio.create_task(target.run())
    try:

        def consumers() -> int:
            return len(broker.queue(INSTRUCTIONS).consumers)

        assert consumers() == 1
        assert target._channel is not None
        channel: Any = target._channel
        real = channel.set_qos

        async def away(**_: Any) -> None:
            raise aiormq.exceptions.ChannelInvalidStateError("the connection is lost")

        channel.set_qos = away
        free[0] = 1
        target.capacity_changed()
        await until(lambda: consumers() == 0, what="the consumers cancelled")
        channel.set_qos = real  # the broker is back; the free slots do not change again
        await until(lambda: consumers() == 1, what="consuming again")
    finally:
        await target.stop()
        running.cancel()
