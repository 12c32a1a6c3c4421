"""Slot accounting and what heartbeats list: held, waiting, and recently reported attempts."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from schemas import MAX_MESSAGE_BYTES, AgentHeartbeat, FailureReason, encode, event_decoder
from schemas.bounds import MAX_IN_FLIGHT
from schemas.resources import Capacity, Resources
from worker_agent.heartbeat import Heartbeat
from worker_agent.slots import MAX_LISTED_REPORTED, MAX_SLOTS, REMEMBERED, Attempt, Fence, Slots

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key() -> tuple[uuid.UUID, int]:
    return (uuid.uuid4(), 1)


def test_a_reported_attempt_is_listed_as_reported_and_holds_no_slot() -> None:
    clock = Clock()
    slots = Slots(2, reported_for_s=60.0, clock=clock)
    first, second = key(), key()
    attempt = slots.take(first)
    assert attempt is not None
    slots.bind(attempt, "c" * 64)
    attempt.state = "running"
    assert slots.take(second) is not None
    assert slots.free() == 0
    assert slots.take(key()) is None

    slots.release(first, reported=True, exit_code=0)

    assert slots.free() == 1
    assert slots.prefetch() == 1
    assert slots.finished(first)
    listed = {(s.run_id, s.attempt): s for s in slots.in_flight()}
    assert listed[first].state == "reported"
    assert listed[first].exit_code == 0
    assert listed[first].container_id == "c" * 64
    assert listed[second].state == "launching"
    assert slots.of_container("c" * 64) is None


async def test_an_exit_frees_the_slot_and_resources_while_the_attempt_is_still_listed() -> None:
    changes: list[int] = []
    slots = Slots(1, capacity=Capacity(memory_mb=100), on_change=lambda: changes.append(1))
    first = key()
    attempt = slots.take(first, Resources(memory_mb=80))
    assert attempt is not None
    slots.bind(attempt, "e" * 64)
    assert slots.free() == 0 and slots.lacks(Resources(memory_mb=80)) is not None
    stopping = asyncio.Event()
    waiter = asyncio.create_task(slots.wait_in_line(stopping, key(), Resources(memory_mb=80)))
    await asyncio.sleep(0)
    assert not waiter.done()
    changes.clear()

    slots.exited(attempt)

    # The next launch takes the slot and the memory before the exit is reported.
    held = await asyncio.wait_for(waiter, 30)
    assert held is not None
    assert changes
    listed = {(s.run_id, s.attempt): s.state for s in slots.in_flight()}
    assert listed[first] == "exited"
    assert slots.of_container("e" * 64) is attempt
    assert not slots.finished(first)
    slots.release(first, reported=True, exit_code=0)
    assert {(s.run_id, s.attempt): s.state for s in slots.in_flight()}[first] == "reported"


def test_exited_attempts_waiting_for_their_report_never_list_more_than_a_heartbeat_holds() -> None:
    slots = Slots(MAX_SLOTS)
    for _ in range(MAX_SLOTS):
        attempt = slots.take(key())
        assert attempt is not None
        slots.exited(attempt)  # none reported: the broker is away, say
    assert slots.free() == 0
    assert slots.take(key()) is None
    assert len(slots.in_flight()) <= MAX_IN_FLIGHT


def test_reported_attempts_expire_from_heartbeats_but_stay_known() -> None:
    clock = Clock()
    slots = Slots(1, reported_for_s=60.0, clock=clock)
    done = key()
    slots.take(done)
    slots.release(done, reported=True, exit_code=3)
    clock.now += 59.0
    assert [s.state for s in slots.in_flight()] == ["reported"]
    clock.now += 2.0
    assert slots.in_flight() == ()
    # Still remembered: a redelivered LaunchRun of it is acked, not run again.
    assert slots.finished(done)


def test_a_slot_released_without_a_report_is_not_listed() -> None:
    slots = Slots(1)
    gone = key()
    slots.take(gone)
    slots.release(gone)  # e.g. the agent stops while the launch waits for Docker
    assert slots.in_flight() == ()
    assert not slots.finished(gone)
    assert slots.free() == 1


def test_heartbeats_list_at_most_the_latest_reported_attempts() -> None:
    clock = Clock()
    slots = Slots(4, clock=clock)
    keys = [key() for _ in range(MAX_LISTED_REPORTED + 50)]
    for k in keys:
        slots.take(k)
        slots.release(k, reported=True, exit_code=0)
        clock.now += 0.001
    held = slots.take(key())
    assert held is not None
    listed = slots.in_flight()
    assert len(listed) == 1 + MAX_LISTED_REPORTED
    assert listed[0].state == "launching"
    # Newest first: the oldest 50 are left out.
    assert (listed[1].run_id, listed[1].attempt) == keys[-1]
    assert (listed[-1].run_id, listed[-1].attempt) == keys[50]
    assert slots.free() == 3
    # What the heartbeat carries is what the contract takes.
    beat = AgentHeartbeat(agent_id="a1", sequence=1, in_flight=listed)
    assert event_decoder().decode(encode(beat)) == beat


def test_an_exit_code_outside_the_contract_is_listed_as_unknown() -> None:
    slots = Slots(1)
    odd = key()
    slots.take(odd)
    slots.release(odd, reported=True, exit_code=300)
    assert slots.in_flight()[0].exit_code is None


async def test_a_delivery_beyond_the_slots_waits_for_one_and_counts_against_prefetch() -> None:
    changes: list[int] = []
    slots = Slots(1, on_change=lambda: changes.append(slots.prefetch()))
    running, waiting = key(), key()
    slots.take(running)
    assert slots.prefetch() == 0
    stopping = asyncio.Event()
    waiter = asyncio.create_task(slots.wait_in_line(stopping, waiting))
    await asyncio.sleep(0)
    assert slots.waiting == 1
    # Freeing the slot does not open the prefetch: the slot is promised to the waiter.
    slots.release(running, reported=True, exit_code=0)
    assert slots.prefetch() == 0
    assert slots.take(key()) is None  # nor does it go to a delivery that came later
    held = await asyncio.wait_for(waiter, 30)
    assert held is not None and held.key == waiting
    assert slots.waiting == 0
    assert slots.prefetch() == 0
    # The consumer was told, and what it reads now is the truth.
    assert changes
    assert slots.prefetch() == 0


async def test_a_waiting_delivery_gives_up_its_wait_when_the_agent_stops() -> None:
    slots = Slots(1)
    slots.take(key())
    stopping = asyncio.Event()
    waiter = asyncio.create_task(slots.wait_in_line(stopping, key()))
    await asyncio.sleep(0)
    stopping.set()
    assert await asyncio.wait_for(waiter, 30) is None
    assert slots.waiting == 0
    assert len(slots.attempts) == 1


CANCELED = Fence(reason=FailureReason.UNEXPECTED_TERMINATION, note="canceled", grace_s=0)


async def test_a_fence_wakes_the_delivery_waiting_for_its_attempt_and_no_other() -> None:
    changes: list[int] = []
    slots = Slots(1, on_change=lambda: changes.append(slots.prefetch()))
    busy, fenced, other = key(), key(), key()
    slots.take(busy)
    stopping = asyncio.Event()
    fenced_waiter = asyncio.create_task(slots.wait_in_line(stopping, fenced))
    other_waiter = asyncio.create_task(slots.wait_in_line(stopping, other))
    await asyncio.sleep(0)
    assert slots.waiting == 2

    slots.fence(fenced, CANCELED)
    # None: look again (and find the fence), though no slot is free.
    assert await asyncio.wait_for(fenced_waiter, 30) is None
    assert slots.free() == 0
    assert slots.waiting == 1
    assert not other_waiter.done()
    assert slots.fenced(fenced) == CANCELED
    assert slots.fenced(other) is None
    # A fence is never listed: the attempt holds no slot and was never reported here.
    assert [(s.run_id, s.attempt) for s in slots.in_flight()] == [busy]

    slots.release(busy, reported=True, exit_code=0)
    held = await asyncio.wait_for(other_waiter, 30)
    assert held is not None and held.key == other
    assert slots.waiting == 0
    slots.release(other, reported=True, exit_code=0)
    assert changes[-1] == slots.prefetch() == 1


def test_fences_are_remembered_up_to_a_bound() -> None:
    slots = Slots(1)
    keys = [key() for _ in range(REMEMBERED + 1)]
    for k in keys:
        slots.fence(k, CANCELED)
    assert slots.fenced(keys[0]) is None
    assert slots.fenced(keys[1]) == CANCELED
    assert slots.fenced(keys[-1]) == CANCELED
    assert slots.in_flight() == ()
    assert slots.free() == 1


class Published:
    """The publisher's side a heartbeat uses: what it sent, encoded as it would travel."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    async def publish(self, exchange: str, routing_key: str, message: AgentHeartbeat) -> None:
        self.payloads.append(encode(message))


def full_agent(max_concurrent: int, held: int, reported: int) -> Slots:
    """An agent with ``held`` attempts holding (or adopted into) its slots and ``reported``
    attempts just reported; every container id and state at its longest."""
    clock = Clock()
    slots = Slots(max_concurrent, clock=clock)
    for _ in range(reported):
        done = key()
        attempt = slots.take(done)
        assert attempt is not None
        slots.bind(attempt, "f" * 64)
        slots.release(done, reported=True, exit_code=255)
    for _ in range(held):
        attempt = Attempt(*key(), container_id="f" * 64, state="s" * 32)
        slots.adopt(attempt)
    return slots


async def beat(slots: Slots) -> AgentHeartbeat:
    """The heartbeat the agent sends, as the monitor decodes it."""
    sent = Published()
    heartbeat = Heartbeat(
        sent,  # type: ignore[arg-type]
        "a" * 64,
        ("default",),
        slots.max_concurrent,
        2.0,
        slots.in_flight,
    )
    heartbeat.synced = True
    await heartbeat.beat()
    [payload] = sent.payloads
    assert len(payload) <= MAX_MESSAGE_BYTES
    beat = event_decoder().decode(payload)
    assert isinstance(beat, AgentHeartbeat)
    return beat


async def test_an_agent_with_every_slot_held_sends_heartbeats_the_monitor_takes() -> None:
    slots = full_agent(MAX_SLOTS, held=MAX_SLOTS, reported=MAX_LISTED_REPORTED)
    sent = await beat(slots)
    assert len(sent.in_flight) == MAX_IN_FLIGHT
    assert sent.synced


async def test_reported_attempts_make_room_for_those_holding_a_slot() -> None:
    # Adopted past its slots (restarted with fewer): reported attempts are left out first.
    slots = full_agent(10, held=MAX_IN_FLIGHT - 10, reported=MAX_LISTED_REPORTED)
    sent = await beat(slots)
    states = [s.state for s in sent.in_flight]
    assert len(states) == MAX_IN_FLIGHT
    assert states.count("reported") == 10
    assert sent.synced  # every attempt holding a slot is listed


async def test_more_attempts_than_a_heartbeat_holds_are_listed_incomplete() -> None:
    slots = full_agent(10, held=MAX_IN_FLIGHT + 200, reported=5)
    sent = await beat(slots)
    assert len(sent.in_flight) == MAX_IN_FLIGHT
    assert all(s.state != "reported" for s in sent.in_flight)
    # Not every run is listed: the monitor must not take one left out for vanished.
    assert not sent.synced
