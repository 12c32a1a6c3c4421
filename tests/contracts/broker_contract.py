"""The broker's contract: publishing (``EventPublisher``, ``DeadLetterer``), deliveries
(``InboundDelivery``) and consuming, as the consumers and the agent rely on them.

``BrokerContract`` holds the tests; a test module subclasses it and gives a ``harness``
fixture: ``tests/unit/test_broker_fake_contract.py`` (``FakeBroker`` and ``FakePublisher``)
and ``tests/integration/test_broker_contract.py`` (RabbitMQ, aio-pika and ``Publisher``).
Every step goes through aio-pika's own surface (channels, exchanges, queues), which the fake
broker offers too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aio_pika.exceptions
import pytest

from schemas import RunStarted, encode
from schemas.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE_HEADER,
    DEAD_LETTER_REASON_HEADER,
    STATUS_EXCHANGE,
    event_routing_key,
)
from transport.connection import TRANSIENT
from transport.delivery import settle
from transport.errors import BrokerRefused
from transport.ports import BrokerPublisher


@dataclass
class BrokerHarness:
    """A broker with the project's topology declared, a connection to it, and a publisher."""

    #: aio-pika's robust connection, or a FakeBroker.
    connection: Any
    publisher: BrokerPublisher

    async def capture(self, exchange: str, routing_key: str = "#") -> Any:
        """A queue of the test's own that gets what ``exchange`` routes with the key."""
        channel = await self.connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key=routing_key)
        return queue

    async def source(self) -> tuple[Any, Any]:
        """(channel, queue): a queue to take deliveries from, on a channel of its own."""
        channel = await self.connection.channel()
        queue = await channel.declare_queue(f"contract.{uuid.uuid4().hex[:8]}", exclusive=True)
        return channel, queue

    async def put(self, queue: Any, body: bytes, **properties: Any) -> None:
        """Publish ``body`` straight to ``queue`` (the default exchange)."""
        channel = await self.connection.channel()
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(body, **properties), routing_key=queue.name
            )
        finally:
            await channel.close()


async def taken(queue: Any, count: int = 1, timeout: float = 10) -> list[Any]:
    """``count`` messages from ``queue`` (acked), waiting for them; then the queue is empty."""
    deadline = time.monotonic() + timeout
    messages: list[Any] = []
    while len(messages) < count:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            messages.append(message)
        elif time.monotonic() > deadline:
            raise AssertionError(f"{len(messages)} of {count} message(s) within {timeout} s")
        else:
            await asyncio.sleep(0.02)
    assert await queue.get(no_ack=True, fail=False) is None, "more messages than expected"
    return messages


async def left_in(queue: Any) -> list[bytes]:
    """The bodies ``queue`` holds now (taken out)."""
    bodies = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        bodies.append(message.body)
    return bodies


def started() -> RunStarted:
    return RunStarted(run_id=uuid.uuid4(), attempt=1, agent_id="a1", container_id="c" * 64)


async def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {condition}")
        await asyncio.sleep(0.01)


class BrokerContract:
    """What the broker side does, fake or real. Subclasses give the ``harness`` fixture."""

    # ----------------------------------------------------------------- publishing

    async def test_a_published_event_is_routed_once_persistent_with_its_id_and_kind(
        self, harness: BrokerHarness
    ) -> None:
        event = started()
        key = event_routing_key(event)
        queue = await harness.capture(STATUS_EXCHANGE, "run.#")
        await harness.publisher.publish(STATUS_EXCHANGE, key, event, headers={"x-test": "1"})
        [message] = await taken(queue)
        assert message.body == encode(event)
        assert message.routing_key == key
        assert message.message_id == str(event.message_id)
        assert message.type == "RunStarted"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.headers == {"x-test": "1"}

    async def test_a_publish_nobody_listens_to_is_confirmed_and_dropped(
        self, harness: BrokerHarness
    ) -> None:
        queue = await harness.capture(STATUS_EXCHANGE, "agent.#")
        await harness.publisher.publish(STATUS_EXCHANGE, "run.started.a1.x", started())
        assert await left_in(queue) == []

    async def test_a_publish_to_a_missing_exchange_is_refused_and_the_publisher_goes_on(
        self, harness: BrokerHarness
    ) -> None:
        with pytest.raises(BrokerRefused):
            await harness.publisher.publish("hd.no-such-exchange", "k", started())
        queue = await harness.capture(STATUS_EXCHANGE)
        await harness.publisher.publish(STATUS_EXCHANGE, "run.started.a1.x", started())
        assert len(await taken(queue)) == 1

    # --------------------------------------------------------------- dead letters

    async def test_a_dead_letter_carries_the_body_its_id_and_our_two_headers_only(
        self, harness: BrokerHarness
    ) -> None:
        dead = await harness.capture(DEAD_LETTER_EXCHANGE, "")
        _, source = await harness.source()
        await harness.put(
            source, b"poison", message_id="m-1", headers={DEAD_LETTER_REASON_HEADER: "forged"}
        )
        [delivery] = await taken_unacked(source)
        await harness.publisher.dead_letter(delivery, "hd.requests", "r" * 5000)
        [letter] = await taken(dead)
        assert letter.body == b"poison"
        assert letter.message_id == "m-1"
        assert letter.headers == {
            DEAD_LETTER_REASON_HEADER: "r" * 1000,
            DEAD_LETTER_QUEUE_HEADER: "hd.requests",
        }
        assert not delivery.processed  # dead-lettering alone settles nothing

    async def test_reject_dead_letters_then_acks(self, harness: BrokerHarness) -> None:
        dead = await harness.capture(DEAD_LETTER_EXCHANGE, "")
        channel, source = await harness.source()
        await harness.put(source, b"poison")
        [delivery] = await taken_unacked(source)
        await harness.publisher.reject(delivery, source.name, "undecodable")
        assert delivery.processed
        [letter] = await taken(dead)
        assert letter.headers[DEAD_LETTER_QUEUE_HEADER] == source.name
        await channel.close()  # an acked delivery does not come back
        assert await left_in(await redeclared(harness, source)) == []

    async def test_reject_acks_even_when_the_dead_letter_is_refused(
        self, harness: BrokerHarness
    ) -> None:
        channel, source = await harness.source()
        await harness.put(source, b"poison")
        [delivery] = await taken_unacked(source)
        admin = await harness.connection.channel()
        await admin.exchange_delete(DEAD_LETTER_EXCHANGE)
        await harness.publisher.reject(delivery, source.name, "undecodable")
        assert delivery.processed
        await channel.close()
        assert await left_in(await redeclared(harness, source)) == []

    # ------------------------------------------------------------------ deliveries

    async def test_an_acked_delivery_is_gone(self, harness: BrokerHarness) -> None:
        channel, source = await harness.source()
        await harness.put(source, b"one")
        [delivery] = await taken_unacked(source)
        assert (delivery.body, delivery.processed, delivery.redelivered) == (b"one", False, False)
        await delivery.ack()
        assert delivery.processed
        await channel.close()
        assert await left_in(await redeclared(harness, source)) == []

    async def test_a_nacked_delivery_comes_back_redelivered(self, harness: BrokerHarness) -> None:
        _, source = await harness.source()
        await harness.put(source, b"one", message_id="m-1")
        [delivery] = await taken_unacked(source)
        await delivery.nack(requeue=True)
        [again] = await taken_unacked(source)
        assert (again.body, again.message_id, again.redelivered) == (b"one", "m-1", True)

    @pytest.mark.parametrize("how", ["reject", "nack"])
    async def test_a_delivery_refused_without_requeue_is_dropped(
        self, harness: BrokerHarness, how: str
    ) -> None:
        channel, source = await harness.source()
        await harness.put(source, b"one")
        [delivery] = await taken_unacked(source)
        await getattr(delivery, how)(requeue=False)
        await channel.close()
        assert await left_in(await redeclared(harness, source)) == []

    async def test_a_multiple_ack_settles_every_earlier_delivery_of_its_channel(
        self, harness: BrokerHarness
    ) -> None:
        channel, source = await harness.source()
        for body in (b"one", b"two", b"three", b"four"):
            await harness.put(source, body)
        first, _, third, _ = await taken_unacked(source, 4)
        await first.ack()
        await third.ack(multiple=True)  # two and three (one is settled already)
        await channel.close()
        assert await left_in(await redeclared(harness, source)) == [b"four"]

    async def test_a_delivery_is_settled_once(self, harness: BrokerHarness) -> None:
        _, source = await harness.source()
        await harness.put(source, b"one")
        [delivery] = await taken_unacked(source)
        await delivery.ack()
        for again in (delivery.ack(), delivery.nack(requeue=True), delivery.reject()):
            with pytest.raises(aio_pika.exceptions.MessageProcessError):
                await again

    async def test_an_unsettled_delivery_goes_back_when_its_channel_closes(
        self, harness: BrokerHarness
    ) -> None:
        channel, source = await harness.source()
        await harness.put(source, b"one")
        await harness.put(source, b"two")
        first, second = await taken_unacked(source, 2)
        await first.ack()
        await channel.close()
        # Too late to settle: the broker took it back. ``settle`` swallows exactly this.
        with pytest.raises(TRANSIENT):
            await second.ack()
        await settle(second.ack())
        assert not second.processed
        queue = await redeclared(harness, source)
        [back] = await taken_unacked(queue)
        assert (back.body, back.redelivered) == (b"two", True)

    # ------------------------------------------------------------------- consuming

    async def test_a_consumer_gets_deliveries_in_order_at_most_prefetch_unacked(
        self, harness: BrokerHarness
    ) -> None:
        channel, source = await harness.source()
        await channel.set_qos(prefetch_count=2)
        got: list[Any] = []

        async def on_message(delivery: Any) -> None:
            got.append(delivery)

        await source.consume(on_message)
        for n in range(5):
            await harness.put(source, str(n).encode())
        await wait_for(lambda: len(got) == 2)
        # Two unacked: the other three wait in the queue until one is settled.
        assert await ready_in(harness, source) == 3
        assert len(got) == 2
        await got[0].ack()
        await wait_for(lambda: len(got) == 3)
        for delivery in got[1:3]:
            await delivery.ack()
        await wait_for(lambda: len(got) == 5)
        assert [d.body for d in got] == [b"0", b"1", b"2", b"3", b"4"]
        await got[3].ack()
        await channel.close()  # got[4] was not acked: it goes back
        assert await left_in(await redeclared(harness, source)) == [b"4"]


async def taken_unacked(queue: Any, count: int = 1, timeout: float = 10) -> list[Any]:
    """``count`` deliveries from ``queue``, left unsettled."""
    deadline = time.monotonic() + timeout
    deliveries: list[Any] = []
    while len(deliveries) < count:
        delivery = await queue.get(no_ack=False, fail=False)
        if delivery is not None:
            deliveries.append(delivery)
        elif time.monotonic() > deadline:
            raise AssertionError(f"{len(deliveries)} of {count} delivery(ies) in {timeout} s")
        else:
            await asyncio.sleep(0.02)
    return deliveries


async def redeclared(harness: BrokerHarness, queue: Any) -> Any:
    """The same queue, on a fresh channel (its first one closed)."""
    channel = await harness.connection.channel()
    return await channel.declare_queue(queue.name, exclusive=True)


async def ready_in(harness: BrokerHarness, queue: Any) -> int:
    """Messages ``queue`` holds ready (not handed out), as the broker counts them."""
    channel = await harness.connection.channel()
    try:
        found = await channel.declare_queue(queue.name, passive=True)
        return int(found.declaration_result.message_count)
    finally:
        await channel.close()
