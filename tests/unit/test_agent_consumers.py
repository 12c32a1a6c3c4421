"""Every consumer of the agent survives every message: poison is dead-lettered once, acked."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from dispatcher.amqp import Delivery
from schemas import LaunchRun, LocationSnapshot, LocationSpec, TerminateRun, encode
from schemas.topology import CONTROL_EXCHANGE, INSTRUCTIONS_EXCHANGE
from worker_agent.consumer import InstructionConsumer
from worker_agent.locations import LocationKeeper

pytestmark = pytest.mark.unit


@dataclass
class Raw:
    """An incoming delivery: its body, where it came from, and how it was settled."""

    body: bytes
    exchange: str = INSTRUCTIONS_EXCHANGE
    routing_key: str = "default"
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
    """The dead-letter side of a publisher: what was dead-lettered, from where, and why."""

    sent: list[tuple[bytes, str, str]] = field(default_factory=list)

    async def dead_letter(self, raw: Raw, queue: str, reason: str) -> None:
        self.sent.append((raw.body, queue, reason))


def launch() -> LaunchRun:
    return LaunchRun(run_id=uuid.uuid4(), attempt=1, image="busybox")


def consumer(handler: Any, dead: DeadLetters) -> InstructionConsumer:
    return InstructionConsumer(None, ("default",), dead, handler, lambda: 1, "a1")  # type: ignore[arg-type]


async def deliver(target: InstructionConsumer, raw: Raw) -> None:
    await target._on_message(raw)  # type: ignore[arg-type]
    await target.drain(5)


async def test_an_undecodable_instruction_is_dead_lettered_once_and_acked() -> None:
    dead = DeadLetters()
    handled: list[object] = []

    async def handler(delivery: Delivery[Any]) -> None:
        handled.append(delivery.message)

    target = consumer(handler, dead)
    raw = Raw(b'{"kind": "LaunchRun", "nonsense": true}')
    await deliver(target, raw)
    assert raw.settled == ["ack"]
    assert handled == []
    [(body, queue, reason)] = dead.sent
    assert (body, queue) == (raw.body, "hd.instructions.default")
    assert "invalid message" in reason


@pytest.mark.parametrize("error", [ValueError("bad"), KeyError("k"), RuntimeError("boom")])
async def test_any_handler_error_dead_letters_the_instruction_and_the_consumer_goes_on(
    error: Exception,
) -> None:
    dead = DeadLetters()
    handled: list[object] = []

    async def handler(delivery: Delivery[Any]) -> None:
        handled.append(delivery.message)
        if len(handled) == 1:
            raise error
        await delivery.raw.ack()

    target = consumer(handler, dead)
    first, second = Raw(encode(launch())), Raw(encode(launch()))
    await deliver(target, first)
    await deliver(target, second)
    assert first.settled == ["ack"]
    assert second.settled == ["ack"]
    [(_, queue, reason)] = dead.sent
    assert queue == "hd.instructions.default"
    assert type(error).__name__ in reason


async def test_a_control_instruction_is_dead_lettered_from_the_control_queue() -> None:
    dead = DeadLetters()

    async def handler(delivery: Delivery[Any]) -> None:
        raise RuntimeError("defect")

    target = consumer(handler, dead)
    terminate = TerminateRun(run_id=uuid.uuid4(), attempt=1)
    raw = Raw(encode(terminate), exchange=CONTROL_EXCHANGE, routing_key="a1")
    await deliver(target, raw)
    assert raw.settled == ["ack"]
    assert [queue for _, queue, _ in dead.sent] == ["hd.control.a1"]


async def test_an_error_after_the_handler_settled_the_instruction_is_not_dead_lettered() -> None:
    dead = DeadLetters()

    async def handler(delivery: Delivery[Any]) -> None:
        await delivery.raw.ack()
        raise RuntimeError("late defect")

    target = consumer(handler, dead)
    raw = Raw(encode(launch()))
    await deliver(target, raw)
    assert raw.settled == ["ack"]
    assert dead.sent == []


def keeper(dead: DeadLetters) -> LocationKeeper:
    return LocationKeeper(None, None, dead, "a1", ("default",))  # type: ignore[arg-type]


async def test_a_poison_location_snapshot_is_dead_lettered_and_acked() -> None:
    dead = DeadLetters()
    target = keeper(dead)
    raw = Raw(b"\xff not json", routing_key="default")
    await target._on_snapshot(raw)  # type: ignore[arg-type]
    assert raw.settled == ["ack"]
    [(_, _, reason)] = dead.sent
    assert "location snapshot refused" in reason


async def test_a_location_snapshot_is_taken_in_and_acked() -> None:
    dead = DeadLetters()
    target = keeper(dead)
    spec = LocationSpec(name="loc", image="busybox")
    raw = Raw(encode(LocationSnapshot(queue="default", locations=(spec,))))
    await target._on_snapshot(raw)  # type: ignore[arg-type]
    assert raw.settled == ["ack"]
    assert dead.sent == []
    assert target._snapshots == {"default": (spec,)}
