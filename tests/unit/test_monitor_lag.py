"""A monitor that reads its heartbeats late does not take its own lag for agents' silence.

The monitor's queue backs up when the broker or the monitor cannot keep up; every agent's
heartbeats then reach it late, and an agent beating on time looks silent. The monitor
measures how late it reads (each heartbeat's ``sent_at`` against the fastest of its agent, so
that clocks need not agree) and counts silence beyond that. Driven on the in-memory store
with a manual clock; the agents' clocks are set apart from the monitor's on purpose.
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime

import pytest

from dispatcher.monitor import FailureMonitor
from schemas import AgentHeartbeat
from tests.unit.test_monitor_rules import INTERVAL_S, World

pytestmark = pytest.mark.unit

#: The monitor's wall clock at the manual clock's 0, and two agents' clocks against it.
EPOCH = 1_800_000_000.0
SKEW = {"agent-a": 0.0, "agent-b": -37.0, "agent-c": 512.0}
#: Loss threshold of these agents: 3 beats of 2 s.
THRESHOLD_S = 3 * INTERVAL_S


class LateWorld(World):
    """Agents that beat on time into the monitor's queue; the monitor reads ``read_batch``
    beats (a batch) every ``read_every`` half-seconds (or all that wait, when 0), sweeping
    every half-second."""

    def __init__(self) -> None:
        super().__init__()
        self.read_every = 0
        self.read_batch = 2
        self.queue: deque[AgentHeartbeat] = deque()
        self.beating = set(SKEW)
        self._sent = dict.fromkeys(SKEW, -INTERVAL_S)
        self._steps = 0
        self.monitor = FailureMonitor(
            self.store, self.settings, self.clock, wall=lambda: EPOCH + self.clock()
        )

    def beat_of(self, agent_id: str, sent_at: float) -> AgentHeartbeat:
        """A heartbeat as ``agent_id`` stamps it at the monitor's time ``sent_at``."""
        stamp = EPOCH + sent_at + SKEW[agent_id]
        return AgentHeartbeat(
            agent_id=agent_id,
            sequence=1,
            interval_s=INTERVAL_S,
            sent_at=datetime.fromtimestamp(stamp, UTC),
        )

    async def run_for(self, seconds: float) -> None:
        for _ in range(round(seconds / 0.5)):
            self.clock.advance(0.5)
            self._steps += 1
            for agent_id in sorted(self.beating):
                if self.clock() - self._sent[agent_id] >= INTERVAL_S:
                    self._sent[agent_id] = self.clock()
                    self.queue.append(self.beat_of(agent_id, self.clock()))
            if self.read_every == 0:
                beats = list(self.queue)
                self.queue.clear()
            elif self._steps % self.read_every == 0 and self.queue:
                beats = [self.queue.popleft() for _ in range(min(self.read_batch, len(self.queue)))]
            else:
                beats = []
            if beats:
                await self.store.apply_events(beats)
                await self.monitor.on_heartbeats(beats)
            await self.monitor.sweep()

    async def status(self, agent_id: str) -> str:
        return str({a.agent_id: a.status for a in await self.store.agents()}[agent_id])

    def times_lost(self, agent_id: str) -> int:
        """How often the agent was declared lost (a return does not undo it)."""
        return self.store.agents_by_id[agent_id].episodes


async def test_agents_beating_on_time_are_not_lost_while_the_monitor_falls_behind() -> None:
    w = LateWorld()
    await w.run_for(10.0)  # read at once: each agent's fastest is known
    assert w.monitor.lag() == pytest.approx(0.0, abs=0.01)
    # The monitor now reads two beats every 2.5 s where three agents send one every 2 s
    # each: each agent is read about every 3.75 s, and later and later.
    w.read_every = 5
    await w.run_for(40.0)
    assert w.monitor.lag() > THRESHOLD_S
    for agent_id in SKEW:
        assert w.times_lost(agent_id) == 0
    # It catches up: the lag is gone, and silence counts as before.
    w.read_every = 0
    await w.run_for(4.0)
    assert w.monitor.lag() == pytest.approx(0.0, abs=0.01)
    w.beating.discard("agent-b")
    await w.run_for(THRESHOLD_S + 2.0)
    assert await w.status("agent-b") == "LOST"
    assert [w.times_lost(a) for a in ("agent-a", "agent-b", "agent-c")] == [0, 1, 0]


async def test_a_backlog_longer_than_a_clock_step_is_still_a_backlog() -> None:
    """Read three beats every 6 s for 20 minutes: the monitor falls more than CLOCK_STEP_S
    behind, and every agent's beats grow later together; that is lag, not clocks stepped."""
    w = LateWorld()
    await w.run_for(10.0)
    w.read_every, w.read_batch = 12, 3
    await w.run_for(1200.0)
    assert w.monitor.lag() > 600.0
    for agent_id in SKEW:
        assert w.times_lost(agent_id) == 0


async def test_with_nothing_left_to_read_the_lag_fades_and_silent_agents_are_lost() -> None:
    w = LateWorld()
    await w.run_for(10.0)
    w.read_every = 4
    await w.run_for(12.0)
    lag = w.monitor.lag()
    assert lag > 1.0
    # Every agent stops; the monitor reads what is left, then nothing more comes.
    w.beating.clear()
    w.read_every = 0
    await w.run_for(0.5)
    await w.run_for(THRESHOLD_S + lag + 1.0)
    assert w.monitor.lag() == 0.0
    for agent_id in SKEW:
        assert await w.status(agent_id) == "LOST"


async def test_one_agent_s_clock_jumping_does_not_make_the_monitor_think_it_is_late() -> None:
    w = LateWorld()
    await w.run_for(10.0)
    before = dict(SKEW)
    try:
        SKEW["agent-c"] -= 3600.0  # its clock set back an hour: its beats look an hour late
        await w.run_for(4.0)
        assert w.monitor.lag() == pytest.approx(0.0, abs=0.01)
    finally:
        SKEW.update(before)


async def test_an_agent_whose_beats_come_ever_later_moves_no_other_agent_s_threshold() -> None:
    """Each beat of agent-c a little less than a clock step later than the one before (its
    clock set back bit by bit, or a forger's): alone in its batches, its beats made the lag,
    which let the next one be later still, without end; agent-b, dead, was never lost."""
    w = LateWorld()
    w.beating.discard("agent-a")  # two agents: agent-b, which dies, and agent-c
    await w.run_for(10.0)
    w.read_every, w.read_batch = 1, 1  # each beat a batch, as a monitor keeping up sees them
    before = dict(SKEW)
    try:
        w.beating.discard("agent-b")
        for _ in range(15):
            SKEW["agent-c"] -= 597.0  # less than a step, and than the lag fades meanwhile
            await w.run_for(2.0)
        # Lost on its silence (with agent-c alone left, its lag is its own affair).
        assert await w.status("agent-b") == "LOST"
    finally:
        SKEW.update(before)
