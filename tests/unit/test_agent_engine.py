"""The engine's health: a ping that hangs or fails makes it unhealthy, one answered again
makes it healthy; each change is told (the agent then re-counts its prefetch)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from schemas import AgentHeartbeat
from tests.fakes.clock import until
from tests.fakes.publisher import FakePublisher
from worker_agent.engine import EngineHealth
from worker_agent.heartbeat import Heartbeat

pytestmark = pytest.mark.unit


async def test_a_hanging_ping_makes_the_engine_unhealthy_until_one_is_answered() -> None:
    frozen = threading.Event()
    thawed = threading.Event()
    failing = False

    def ping() -> bool:
        if frozen.is_set():
            thawed.wait(10)  # a SIGSTOPped dockerd: the call just waits
        if failing:
            raise ConnectionRefusedError("connection refused")
        return True

    changes: list[bool] = []
    # A healthy ping (on a thread) must answer within the timeout: 2 s, so that a loaded
    # machine does not make one late; the frozen ping is held by an event, not by time.
    health = EngineHealth(ping, interval_s=0.01, timeout_s=2.0)
    health._on_change = lambda: changes.append(health.ok)
    running = asyncio.create_task(health.run())
    try:
        await asyncio.sleep(0.1)
        assert (health.ok, changes) == (True, [])
        frozen.set()
        await until(lambda: not health.ok, what="the engine unhealthy")
        assert health.error == "no answer to a ping in 2 s"
        frozen.clear()
        thawed.set()
        await until(lambda: health.ok, what="the engine healthy again")
        failing = True
        await until(lambda: not health.ok, what="a refused ping")
        assert health.error == "ConnectionRefusedError: connection refused"
        assert changes == [False, True, False]
    finally:
        thawed.set()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_the_heartbeat_says_whether_the_engine_answers() -> None:
    state = (False, "no answer to a ping in 5 s \x00" + "x" * 5000)
    beat = Heartbeat(
        FakePublisher(), "a1", ("default",), 2, 1.0, lambda: (), engine=lambda: state
    ).message()
    assert isinstance(beat, AgentHeartbeat)
    assert beat.engine_ok is False
    assert beat.engine_error.startswith("no answer to a ping in 5 s")
    assert "\x00" not in beat.engine_error and len(beat.engine_error.encode()) <= 1000
