"""Slot accounting and what heartbeats list: held, waiting, and recently reported attempts."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from schemas import AgentHeartbeat, encode, event_decoder
from worker_agent.slots import MAX_LISTED_REPORTED, Slots

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
    running = key()
    slots.take(running)
    assert slots.prefetch() == 0
    stopping = asyncio.Event()
    waiter = asyncio.create_task(slots.wait_for_free(stopping))
    await asyncio.sleep(0)
    assert slots.waiting == 1
    # Freeing the slot does not open the prefetch: the slot is promised to the waiter.
    slots.release(running, reported=True, exit_code=0)
    assert slots.prefetch() == 0
    assert await asyncio.wait_for(waiter, 5) is True
    assert slots.waiting == 0
    assert slots.take(key()) is not None
    assert slots.prefetch() == 0
    # The consumer was told, and what it reads now is the truth.
    assert changes
    assert slots.prefetch() == 0


async def test_a_waiting_delivery_gives_up_its_wait_when_the_agent_stops() -> None:
    slots = Slots(1)
    slots.take(key())
    stopping = asyncio.Event()
    waiter = asyncio.create_task(slots.wait_for_free(stopping))
    await asyncio.sleep(0)
    stopping.set()
    assert await asyncio.wait_for(waiter, 5) is False
    assert slots.waiting == 0
    assert len(slots.attempts) == 1
