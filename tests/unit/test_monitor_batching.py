"""The failure monitor's decisions taken many at a time, on the in-memory store.

A sweep declares every agent it finds lost (or gone) in one transaction; a batch of
deliveries records every return and fencing its heartbeats call for in one transaction. What
is asserted is what users see (agents' statuses, runs failed over once, alerts once, the
TerminateRun messages waiting in the outbox), how many transactions it took (each call of
the store is one), and that a decision the store could not record (PostgreSQL down) is
recorded later: by the next sweep, by the batch handed over again, or by a successor.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import REGISTRY

from dispatcher.errors import StoreUnavailable
from dispatcher.monitor import FailureMonitor
from dispatcher.states import RunState
from dispatcher.store import AgentLoss, decision_id
from schemas import AgentHeartbeat, ContainerState, Event, RunClaimed, RunFailed
from tests.fakes.supervision import FakeSupervision
from tests.unit.test_monitor_rules import INTERVAL_S, World, state
from transport.delivery import Delivery

pytestmark = pytest.mark.unit

AGENTS = [f"agent-{n}" for n in range(5)]


@dataclass
class RecordingStore(FakeSupervision):
    """The fake store, recording the monitor's calls (one transaction each) and failing
    those of the methods named in ``down`` as PostgreSQL's absence does."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    down: set[str] = field(default_factory=set)

    def _call(self, name: str, argument: Any) -> None:
        self.calls.append((name, argument))
        if name in self.down:
            raise StoreUnavailable(f"PostgreSQL unavailable ({name})")

    def made(self, name: str) -> list[Any]:
        """The arguments of each call of ``name``, in order."""
        return [argument for called, argument in self.calls if called == name]

    async def declare_agents_lost(self, losses: Any) -> dict[str, list[uuid.UUID]]:
        self._call("declare_agents_lost", sorted(loss.agent_id for loss in losses))
        return await super().declare_agents_lost(losses)

    async def agents_left(self, agent_ids: Any) -> list[str]:
        self._call("agents_left", sorted(agent_ids))
        return await super().agents_left(agent_ids)

    async def agents_back(self, agent_ids: Any) -> list[str]:
        self._call("agents_back", sorted(agent_ids))
        return await super().agents_back(agent_ids)

    async def fence_all(self, listings: Any) -> dict[str, int]:
        self._call("fence_all", sorted(listings))
        return await super().fence_all(listings)


def recording_world(**settings: Any) -> tuple[World, RecordingStore]:
    w = World(**settings)
    store = w.store = RecordingStore(w.clock)
    w.monitor = w.new_monitor()
    return w, store


def heartbeat(agent_id: str, *listed: tuple[uuid.UUID, int], sequence: int = 1) -> AgentHeartbeat:
    return AgentHeartbeat(
        agent_id=agent_id,
        sequence=sequence,
        interval_s=INTERVAL_S,
        in_flight=tuple(ContainerState(run_id=r, attempt=a, state="running") for r, a in listed),
    )


async def deliver(w: World, monitor: FailureMonitor, beats: list[AgentHeartbeat]) -> None:
    """One batch of deliveries on the monitor's queue, recorded first by the control plane."""
    await w.store.apply_events(beats)
    batch: list[Delivery[Event]] = [Delivery(beat, raw=None) for beat in beats]  # type: ignore[arg-type]
    await monitor.on_events(batch)


async def running_on_each(w: World) -> dict[str, uuid.UUID]:
    """A STARTED run on each of AGENTS, each agent beating once, listing it."""
    runs = {}
    for agent_id in AGENTS:
        runs[agent_id] = await w.submit()
        await w.started(runs[agent_id], agent_id)
    await deliver(w, w.monitor, [heartbeat(a, (runs[a], 1)) for a in AGENTS])
    return runs


def alerts(w: World, kind: str) -> list[str]:
    return sorted(a.subject for a in w.store.alerts.values() if a.kind == kind)


def gauges() -> tuple[float | None, float | None]:
    return (
        REGISTRY.get_sample_value("hd_agents_alive"),
        REGISTRY.get_sample_value("hd_agents_lost"),
    )


# ----------------------------------------------------------------------- losses


async def test_agents_lost_in_one_sweep_are_declared_in_one_transaction() -> None:
    w, store = recording_world(lost_after_beats=3)
    runs = await running_on_each(w)
    w.live("agent-b")  # beats on, and stays out of it
    await w.elapse(3 * INTERVAL_S + 0.5)  # every agent of AGENTS silent past the threshold

    assert store.made("declare_agents_lost") == [AGENTS]
    for agent_id, run_id in runs.items():
        assert w.status(agent_id) == "LOST"
        assert state(w.run(run_id)) == (RunState.QUEUED, 2, "AGENT_LOST")
        assert w.terminations(agent_id) == [(run_id, 1)]
    assert w.status("agent-b") == "ALIVE"
    assert alerts(w, "agent_down") == sorted(f"agent {a}" for a in AGENTS)

    # Later sweeps, and a successor's, take none of these decisions again.
    await w.elapse(30)
    w.monitor = w.new_monitor()
    await w.monitor.load()
    await w.elapse(30)
    assert store.made("declare_agents_lost") == [AGENTS]
    assert sorted(w.decisions()) == sorted((r, 1, "AGENT_LOST") for r in runs.values())
    assert len(alerts(w, "agent_down")) == len(AGENTS)


async def test_a_store_that_declares_a_batch_twice_changes_nothing_the_second_time() -> None:
    w, store = recording_world()
    runs = await running_on_each(w)
    losses = [AgentLoss(a, 7.0) for a in AGENTS]
    first = await store.declare_agents_lost(losses)
    again = await store.declare_agents_lost([*losses, AgentLoss("nobody", 7.0)])
    assert first == {a: [runs[a]] for a in AGENTS}
    assert again == {}
    assert len(alerts(w, "agent_down")) == len(AGENTS)
    assert len(store.written(RunFailed)) == len(AGENTS)


async def test_a_loss_the_store_could_not_record_is_declared_by_the_next_sweep() -> None:
    w, store = recording_world(lost_after_beats=3)
    runs = await running_on_each(w)
    w.clock.advance(3 * INTERVAL_S + 0.5)
    store.down.add("declare_agents_lost")
    with pytest.raises(StoreUnavailable):
        await w.monitor.sweep()
    assert [w.status(a) for a in AGENTS] == ["ALIVE"] * len(AGENTS)

    store.down.clear()  # PostgreSQL is back
    await w.monitor.sweep()
    assert store.made("declare_agents_lost") == [AGENTS, AGENTS]
    for agent_id, run_id in runs.items():
        assert w.status(agent_id) == "LOST"
        assert state(w.run(run_id)) == (RunState.QUEUED, 2, "AGENT_LOST")
    assert len(alerts(w, "agent_down")) == len(AGENTS)


async def test_drained_agents_that_stop_leave_in_one_transaction() -> None:
    w, store = recording_world()
    for agent_id in AGENTS:
        await w.beat(agent_id, draining=True)
    await w.elapse(10 * INTERVAL_S)
    assert store.made("agents_left") == [AGENTS]
    assert store.made("declare_agents_lost") == []
    assert [w.status(a) for a in AGENTS] == ["LEFT"] * len(AGENTS)
    assert alerts(w, "agent_down") == []


# ---------------------------------------------------------------------- returns


async def lose_and_fail_over(w: World, store: RecordingStore) -> dict[str, uuid.UUID]:
    """AGENTS lost, their runs started again on agent-b as attempt 2; the calls so far are
    forgotten."""
    runs = await running_on_each(w)
    await w.elapse(4 * INTERVAL_S)
    for run_id in runs.values():
        await w.started(run_id, "agent-b", attempt=2)
    assert [w.status(a) for a in AGENTS] == ["LOST"] * len(AGENTS)
    store.calls.clear()
    return runs


async def test_returns_in_one_batch_of_deliveries_are_recorded_in_one_transaction() -> None:
    w, store = recording_world()
    runs = await lose_and_fail_over(w, store)
    # Back all at once, each still running its superseded attempt, with agent-b's beat.
    beats = [heartbeat(a, (runs[a], 1), sequence=2) for a in AGENTS]
    beats.append(heartbeat("agent-b", *((r, 2) for r in runs.values())))
    await deliver(w, w.monitor, beats)

    assert store.made("agents_back") == [AGENTS]
    # Fencing: every returning agent, and agent-b on its first heartbeat, in one go.
    assert store.made("fence_all") == [sorted([*AGENTS, "agent-b"])]
    assert [w.status(a) for a in AGENTS] == ["ALIVE"] * len(AGENTS)
    assert alerts(w, "agent_back") == sorted(f"agent {a}" for a in AGENTS)
    for agent_id, run_id in runs.items():
        assert decision_id(run_id, 1, f"fence:{agent_id}") in w.store.outbox
        assert state(w.run(run_id)) == (RunState.STARTED, 2, "AGENT_LOST")
    assert w.terminations("agent-b") == []

    # Their next heartbeats call for nothing: no transaction at all.
    await deliver(w, w.monitor, [heartbeat(a, (runs[a], 1), sequence=3) for a in AGENTS])
    assert store.made("agents_back") == [AGENTS]
    assert len(store.made("fence_all")) == 1
    assert len(alerts(w, "agent_back")) == len(AGENTS)


async def test_a_return_the_store_could_not_record_is_recorded_when_handed_over_again() -> None:
    w, store = recording_world()
    runs = await lose_and_fail_over(w, store)
    beats = [heartbeat(a, (runs[a], 1), sequence=2) for a in AGENTS]
    store.down.add("agents_back")
    with pytest.raises(StoreUnavailable):
        await deliver(w, w.monitor, beats)
    assert [w.status(a) for a in AGENTS] == ["LOST"] * len(AGENTS)

    # The consumer holds the batch and hands it over again once PostgreSQL is back; the view
    # already holds the agents alive, and their returns are recorded all the same.
    store.down.clear()
    await w.monitor.on_events([Delivery(b, raw=None) for b in beats])  # type: ignore[arg-type]
    assert store.made("agents_back") == [AGENTS, AGENTS]
    assert [w.status(a) for a in AGENTS] == ["ALIVE"] * len(AGENTS)
    assert len(alerts(w, "agent_back")) == len(AGENTS)
    for agent_id, run_id in runs.items():
        assert decision_id(run_id, 1, f"fence:{agent_id}") in w.store.outbox


async def test_fencing_the_store_could_not_record_is_recorded_when_handed_over_again() -> None:
    w, store = recording_world()
    runs = await lose_and_fail_over(w, store)
    beats = [heartbeat(a, (runs[a], 1), sequence=2) for a in AGENTS]
    store.down.add("fence_all")
    with pytest.raises(StoreUnavailable):
        await deliver(w, w.monitor, beats)
    store.down.clear()
    await w.monitor.on_events([Delivery(b, raw=None) for b in beats])  # type: ignore[arg-type]
    assert store.made("fence_all") == [AGENTS, AGENTS]
    for agent_id, run_id in runs.items():
        assert decision_id(run_id, 1, f"fence:{agent_id}") in w.store.outbox


async def test_a_return_its_monitor_died_before_recording_is_recorded_by_the_successor() -> None:
    w, store = recording_world()
    runs = await lose_and_fail_over(w, store)
    beats = [heartbeat(a, (runs[a], 1), sequence=2) for a in AGENTS]
    store.down.add("agents_back")
    with pytest.raises(StoreUnavailable):
        await deliver(w, w.monitor, beats)
    # That monitor is gone, its deliveries unacked; a standby takes over and gets them.
    store.down.clear()
    successor = w.new_monitor()
    await successor.load()
    await successor.on_events([Delivery(b, raw=None) for b in beats])  # type: ignore[arg-type]
    assert [w.status(a) for a in AGENTS] == ["ALIVE"] * len(AGENTS)
    assert len(alerts(w, "agent_back")) == len(AGENTS)


# ----------------------------------------------------------------------- gauges


async def test_the_gauges_follow_the_view_as_agents_come_are_lost_and_return() -> None:
    w, _ = recording_world()
    await w.beat("old-lost")
    await w.elapse(4 * INTERVAL_S)
    w.monitor = w.new_monitor()
    await w.monitor.load()
    assert gauges() == (0, 1)

    runs = await running_on_each(w)  # five new agents in one batch
    assert gauges() == (5, 1)
    await w.elapse(4 * INTERVAL_S)
    assert gauges() == (0, 6)
    await deliver(w, w.monitor, [heartbeat(a, (runs[a], 1), sequence=2) for a in AGENTS[:2]])
    assert gauges() == (2, 4)
    alive = sum(1 for v in w.monitor.agents.values() if not v.lost)
    assert gauges() == (alive, len(w.monitor.agents) - alive)


async def test_a_batch_handed_over_again_is_not_heard_twice() -> None:
    """Each handing of the same heartbeat used to count as a beat more, and a beat more that
    did not list a run counted as one more time its agent left it out: a first beat handed
    over four times (its fencing not recorded) failed a claimed run as vanished, 6 s early."""
    w, store = recording_world(vanished_after_beats=3)
    listed, claimed = await w.submit(), await w.submit()
    await w.started(listed, "agent-a")
    await w.store.apply_events([RunClaimed(run_id=claimed, attempt=1, agent_id="agent-a")])
    # Its first beat, composed before the claim, lists only the other run; fencing it fails.
    beat = heartbeat("agent-a", (listed, 1))
    store.down.add("fence_all")
    for _ in range(4):
        with pytest.raises(StoreUnavailable):
            await w.monitor.on_events([Delivery(beat, raw=None)])  # type: ignore[arg-type]
        w.clock.advance(0.5)
        await w.monitor.sweep()
    assert w.monitor.agents["agent-a"].beats == 1
    assert w.run(claimed).failure_reason is None
    store.down.clear()
    await w.monitor.on_events([Delivery(beat, raw=None)])  # type: ignore[arg-type]
    assert store.made("fence_all")[-1] == ["agent-a"]
