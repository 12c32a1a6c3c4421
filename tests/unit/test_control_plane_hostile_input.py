"""Hostile and unusual input against the control plane: the monitor's view of agents, the HTTP
API's headers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from litestar.exceptions import ValidationException

from dispatcher.states import RunState
from dispatcher.web.app import event_id_header
from schemas import AgentHeartbeat
from tests.unit.test_monitor_rules import INTERVAL_S, World, state

A, B = "agent-a", "agent-b"


async def test_one_heartbeat_stamped_in_the_future_does_not_blind_the_monitor_to_losses() -> None:
    """An agent whose clock ran a day ahead once (a clock stepped back by NTP, or a hostile
    agent) must not stop the monitor from declaring another agent lost."""
    w = World(lost_after_beats=3)
    run_id = await w.submit()
    await w.started(run_id, A)
    await w.beat(A, (run_id, 1))  # A's last heartbeat: A dies now
    ahead = AgentHeartbeat(
        agent_id=B, sequence=1, interval_s=INTERVAL_S, sent_at=datetime.now(UTC) + timedelta(days=1)
    )
    await w.store.apply_events([ahead])
    await w.monitor.on_heartbeat(ahead)
    w.live(B)  # from now on B beats on time, its clock set right
    await w.elapse(10 * INTERVAL_S)  # A has been silent for 5 times its threshold
    assert w.status(A) == "LOST"
    assert state(w.run(run_id)) == (RunState.QUEUED, 2, "AGENT_LOST")


async def test_a_run_held_by_an_agent_the_monitor_never_heard_from_is_not_stuck() -> None:
    """A run claimed and started by an agent that never beats (a hostile identity, or one
    killed before its first heartbeat got through) must not stay STARTED for ever."""
    w = World(lost_after_beats=3)
    run_id = await w.submit()
    await w.started(run_id, "never-beats")
    w.live(B)
    await w.elapse(1000)  # past 3 x 300 s (an agent never heard from may beat that seldom)
    assert w.run(run_id).state != RunState.STARTED


@pytest.mark.parametrize("header", ["\u00b2", "\u00b9\u00b3", "12a", "-1", "", "9" * 30])
def test_a_last_event_id_that_is_not_an_event_id_is_a_400(header: str) -> None:
    """'²' (byte 0xB2, read as latin-1 as ASGI headers are) passes str.isdigit() but not
    int(): refused as any other bad value, with the header named, never a 500."""
    with pytest.raises(ValidationException, match="Last-Event-ID"):
        event_id_header(header)
    assert event_id_header("42") == 42
