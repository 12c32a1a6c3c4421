"""The shared consumer's batching, poison handling and holding, on the in-memory broker.

``transport.consumer.Consumer`` is the real one; the broker and the publisher are fakes
(``tests/fakes/broker.py``), held to RabbitMQ by the broker contract.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from schemas import Event, RunStarted, encode, event_decoder
from schemas.topology import DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER
from tests.fakes.broker import FakeBroker, FakeDelivery, QueueState
from tests.fakes.clock import until
from tests.fakes.publisher import FakePublisher
from transport.consumer import Consumer
from transport.delivery import Delivery
from transport.errors import BrokerRefused, HandlerUnavailable, MessageRejected
from transport.topology import declare_topology

pytestmark = pytest.mark.unit

QUEUE = "hd.status.store"
Handler = Callable[[list[Delivery[Event]]], Awaitable[None]]


def event(agent: str = "a1") -> RunStarted:
    return RunStarted(run_id=uuid.uuid4(), attempt=1, agent_id=agent, container_id="c" * 64)


class Harness:
    """A consumer of QUEUE on a fake broker, and what its handler was handed."""

    def __init__(self) -> None:
        self.broker = FakeBroker()
        self.publisher = FakePublisher(self.broker)
        self.batches: list[list[bytes]] = []
        self.poisoned: list[tuple[bytes, object, str]] = []
        self.consumer: Consumer[Event] | None = None
        self._running: asyncio.Task[None] | None = None

    @property
    def queue(self) -> QueueState:
        return self.broker.queue(QUEUE)

    async def start(self, handler: Handler | None = None, **options: Any) -> None:
        """Start consuming; ``run`` starts later (``run``), so that deliveries pile up."""

        async def recording(batch: list[Delivery[Event]]) -> None:
            self.batches.append([d.raw.body for d in batch])
            if handler is not None:
                await handler(batch)

        async def on_poison(body: bytes, message: object, reason: str) -> None:
            self.poisoned.append((body, message, reason))

        async with self.broker.channel() as channel:
            await declare_topology(channel)  # type: ignore[arg-type]  # aio-pika's surface  # as every process does at start-up
        connection: Any = self.broker
        self.consumer = Consumer(
            connection,
            QUEUE,
            event_decoder(),
            recording,
            self.publisher,
            on_poison=on_poison,
            **options,
        )
        await self.consumer.start()

    async def put(self, *bodies: bytes) -> list[FakeDelivery]:
        """Deliver ``bodies``; returns the deliveries once the consumer holds them all."""
        for body in bodies:
            self.queue.put_body(body)
        await until(lambda: self.queue.unacked >= len(bodies) and not self.queue.ready)
        return self.held()

    def held(self) -> list[FakeDelivery]:
        """Deliveries handed out and not settled, in delivery order."""
        return self.broker.unacked_of(QUEUE)

    def run(self) -> None:
        assert self.consumer is not None
        self._running = asyncio.create_task(self.consumer.run())

    async def stop(self) -> None:
        assert self.consumer is not None
        await self.consumer.stop()
        if self._running is not None:
            await asyncio.wait_for(self._running, 5)
        await self.consumer.close()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    made = Harness()
    yield made
    if made._running is not None and not made._running.done():
        made._running.cancel()
        await asyncio.gather(made._running, return_exceptions=True)


async def test_deliveries_that_arrive_together_are_one_batch_acked_after_the_handler(
    harness: Harness,
) -> None:
    seen_unsettled: list[bool] = []

    async def handler(batch: list[Delivery[Event]]) -> None:
        seen_unsettled.extend(not d.raw.processed for d in batch)

    await harness.start(handler)
    bodies = [encode(event()) for _ in range(3)]
    deliveries = await harness.put(*bodies)
    harness.run()
    await until(lambda: all(d.processed for d in deliveries), what="the batch acked")
    assert harness.batches == [bodies]
    assert seen_unsettled == [True, True, True]
    assert [d.settlements for d in deliveries] == [["ack"]] * 3
    assert harness.publisher.dead_letters == []
    await harness.stop()
    assert not harness.queue.ready  # nothing went back


async def test_a_batch_holds_at_most_max_batch_messages(harness: Harness) -> None:
    await harness.start(max_batch=2)
    bodies = [encode(event()) for _ in range(5)]
    deliveries = await harness.put(*bodies)
    harness.run()
    await until(lambda: all(d.processed for d in deliveries), what="every batch acked")
    assert harness.batches == [bodies[0:2], bodies[2:4], bodies[4:5]]


async def test_a_batch_is_acked_with_one_ack_of_its_last_delivery(harness: Harness) -> None:
    await harness.start(max_batch=3)
    bodies = [encode(event()) for _ in range(5)]
    deliveries = await harness.put(*bodies)
    [channel] = {d.channel for d in deliveries}
    harness.run()
    await until(lambda: all(d.processed for d in deliveries), what="every batch acked")
    assert harness.batches == [bodies[0:3], bodies[3:5]]
    # One ack a batch, "up to and including" its last delivery: each acked exactly once.
    assert channel.acks_sent == 2
    assert [d.settlements for d in deliveries] == [["ack"]] * 5
    assert harness.queue.unacked == 0


async def test_a_batch_left_unacked_is_not_acked_by_the_next_one(harness: Harness) -> None:
    calls = 0

    async def handler(batch: list[Delivery[Event]]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            # The shutdown begins while the store is out and the first batch is in hand.
            assert harness.consumer is not None
            await harness.consumer.stop()
            raise HandlerUnavailable("the store is down")

    await harness.start(handler, max_batch=2)
    bodies = [encode(event()) for _ in range(4)]
    deliveries = await harness.put(*bodies)
    harness.run()
    await until(lambda: all(d.processed for d in deliveries[2:]), what="the second batch acked")
    # The second batch, handled while stopping, is acked; the first one is not.
    assert [d.settlements for d in deliveries] == [[], [], ["ack"], ["ack"]]
    await harness.stop()
    assert [s.body for s in harness.queue.ready] == bodies[0:2]


async def test_poison_is_dead_lettered_once_with_its_reason_and_acked_the_rest_handled(
    harness: Harness,
) -> None:
    await harness.start()
    good = [encode(event()), encode(event())]
    deliveries = await harness.put(good[0], b'{"kind": "RunStarted"}', good[1])
    harness.run()
    await until(lambda: all(d.processed for d in deliveries), what="all settled")
    assert harness.batches == [good]
    assert [d.settlements for d in deliveries] == [["ack"]] * 3
    [letter] = harness.publisher.dead_letters
    assert letter.body == b'{"kind": "RunStarted"}'
    assert letter.headers[DEAD_LETTER_QUEUE_HEADER] == QUEUE
    assert "invalid message" in letter.headers[DEAD_LETTER_REASON_HEADER]
    [(body, message, reason)] = harness.poisoned
    assert (body, message) == (letter.body, None)
    assert reason == letter.headers[DEAD_LETTER_REASON_HEADER]


async def test_a_message_its_check_refuses_is_poison(harness: Harness) -> None:
    def verify(routing_key: str | None, message: Event) -> None:
        if getattr(message, "agent_id", None) == "forger":
            raise MessageRejected("sent under another agent's key")

    await harness.start(verify=verify)
    honest, forged = encode(event()), encode(event("forger"))
    deliveries = await harness.put(honest, forged)
    harness.run()
    await until(lambda: all(d.processed for d in deliveries), what="all settled")
    assert harness.batches == [[honest]]
    [letter] = harness.publisher.dead_letters
    assert letter.headers[DEAD_LETTER_REASON_HEADER] == "sent under another agent's key"


async def test_another_handler_error_is_narrowed_down_to_the_one_message(
    harness: Harness,
) -> None:
    bad = event()

    async def handler(batch: list[Delivery[Event]]) -> None:
        if any(d.message.message_id == bad.message_id for d in batch):
            raise ValueError("cannot apply it")

    await harness.start(handler)
    first, second = encode(event()), encode(event())
    deliveries = await harness.put(first, encode(bad), second)
    harness.run()
    await until(lambda: all(d.processed for d in deliveries), what="all settled")
    # The whole batch, then one message at a time: the others are applied.
    assert harness.batches == [[first, encode(bad), second], [first], [encode(bad)], [second]]
    assert [d.settlements for d in deliveries] == [["ack"]] * 3
    [letter] = harness.publisher.dead_letters
    assert letter.body == encode(bad)
    assert letter.headers[DEAD_LETTER_REASON_HEADER] == "handler error: ValueError: cannot apply it"
    [(_, message, _)] = harness.poisoned
    assert message == bad


async def test_a_lone_message_whose_handler_fails_is_dead_lettered_at_once(
    harness: Harness,
) -> None:
    async def handler(batch: list[Delivery[Event]]) -> None:
        raise RuntimeError("defect")

    await harness.start(handler)
    [delivery] = await harness.put(encode(event()))
    harness.run()
    await until(lambda: delivery.processed, what="settled")
    assert len(harness.batches) == 1
    assert delivery.settlements == ["ack"]
    assert len(harness.publisher.dead_letters) == 1


async def test_handler_unavailable_holds_the_batch_and_hands_it_over_again(
    harness: Harness,
) -> None:
    outage = asyncio.Event()
    outage.set()

    async def handler(batch: list[Delivery[Event]]) -> None:
        if outage.is_set():
            raise HandlerUnavailable("the store is restarting")

    await harness.start(handler)
    bodies = [encode(event()), encode(event())]
    deliveries = await harness.put(*bodies)
    harness.run()
    await until(lambda: len(harness.batches) == 1, what="the first try")
    # Held: not acked, not nacked, not requeued, not dead-lettered.
    assert [d.settlements for d in deliveries] == [[], []]
    assert (len(harness.queue.ready), harness.queue.unacked) == (0, 2)
    outage.clear()
    await until(lambda: all(d.processed for d in deliveries), what="acked once back")
    assert harness.batches == [bodies, bodies]  # the same batch, in the same order
    assert [d.settlements for d in deliveries] == [["ack"]] * 2
    assert harness.publisher.dead_letters == []


async def test_a_batch_held_when_the_consumer_stops_goes_back_to_the_queue_unacked(
    harness: Harness,
) -> None:
    async def handler(batch: list[Delivery[Event]]) -> None:
        # The shutdown begins while the store is out and the batch is in the handler.
        assert harness.consumer is not None
        await harness.consumer.stop()
        raise HandlerUnavailable("the store is down")

    await harness.start(handler)
    bodies = [encode(event()), encode(event())]
    deliveries = await harness.put(*bodies)
    harness.run()
    await harness.stop()  # ``run`` returns at once: the held batch is given up, unsettled
    assert harness.batches == [bodies]
    assert [d.settlements for d in deliveries] == [[], []]
    # Its channel closed: the broker has the messages again, marked redelivered.
    assert [(s.body, s.redelivered) for s in harness.queue.ready] == [(b, True) for b in bodies]
    assert harness.publisher.dead_letters == []


async def test_poison_whose_dead_letter_is_refused_is_acked_anyway(harness: Harness) -> None:
    await harness.start()
    harness.publisher.failure = BrokerRefused("no such exchange")
    [delivery] = await harness.put(b"not json")
    harness.run()
    await until(lambda: delivery.processed, what="settled")
    assert delivery.settlements == ["ack"]
    assert harness.batches == []


async def test_without_dead_letters_poison_is_dropped_and_acked(harness: Harness) -> None:
    await harness.start(dead_letters=False)
    [delivery] = await harness.put(b"not json")
    harness.run()
    await until(lambda: delivery.processed, what="settled")
    assert delivery.settlements == ["ack"]
    assert harness.publisher.dead_letters == []
    assert len(harness.poisoned) == 1
