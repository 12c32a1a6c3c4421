"""The failure monitor's rules, on the in-memory store and a manual clock.

Each test drives ``FailureMonitor`` as the monitor process does: heartbeats recorded by the
control plane and delivered on the monitor's queue (``on_heartbeat``), sweeps every
``SWEEP_S`` (``sweep``), a takeover (``load``). Agents report their runs' events to the store
as they would. What is asserted is what users see: runs' states and attempts, agents'
statuses, TerminateRun and LaunchRun messages waiting in the outbox, alerts.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from dispatcher.monitor import FENCE_EVERY, FINISHED_STATES, FailureMonitor
from dispatcher.settings import MonitorSettings
from dispatcher.states import RunState
from dispatcher.store import decision_id
from schemas import (
    AgentHeartbeat,
    ContainerState,
    FailureReason,
    LaunchRun,
    RunClaimed,
    RunFailed,
    RunLaunched,
    RunStarted,
    RunSucceeded,
    SubmitRun,
    TerminateRun,
)
from tests.fakes.clock import ManualClock
from tests.fakes.supervision import FakeRun, FakeSupervision

A, B = "agent-a", "agent-b"
#: The sweep interval of the real process (``MonitorSettings.sweep_interval_s``).
SWEEP_S = 0.5
INTERVAL_S = 2.0

Listed = tuple[uuid.UUID, int] | tuple[uuid.UUID, int, str]


class World:
    """One monitor over the fake store, agents that beat on schedule, and a manual clock."""

    def __init__(self, **settings: Any) -> None:
        self.clock = ManualClock()
        self.store = FakeSupervision(self.clock)
        self.settings = MonitorSettings(
            amqp_url="amqp://unused", database_url="postgresql://unused", **settings
        )
        self.monitor = self.new_monitor()
        #: What each live agent lists in its heartbeats; agents not here are silent.
        self.listings: dict[str, list[Listed]] = {}
        self.synced: dict[str, bool] = {}
        #: Agents whose heartbeats say their Docker engine does not answer.
        self.engine_down: set[str] = set()
        self._last_beat: dict[str, float] = {}
        self._sequence = 0

    def new_monitor(self) -> FailureMonitor:
        return FailureMonitor(self.store, self.settings, self.clock)

    # ------------------------------------------------------------------ agents

    async def beat(
        self,
        agent_id: str,
        *listed: Listed,
        synced: bool = True,
        interval_s: float = INTERVAL_S,
        draining: bool = False,
    ) -> None:
        """One heartbeat: recorded by the control plane, then delivered to the monitor."""
        self._sequence += 1
        beat = AgentHeartbeat(
            agent_id=agent_id,
            sequence=self._sequence,
            interval_s=interval_s,
            in_flight=tuple(
                ContainerState(run_id=item[0], attempt=item[1], state=(*item, "running")[2])
                for item in listed
            ),
            synced=synced,
            draining=draining,
            engine_ok=agent_id not in self.engine_down,
            engine_error="no answer to a ping in 5 s" if agent_id in self.engine_down else "",
        )
        await self.store.apply_events([beat])
        await self.monitor.on_heartbeat(beat)
        self._last_beat[agent_id] = self.clock()

    def live(self, agent_id: str, *listed: Listed, synced: bool = True) -> None:
        """From now on ``agent_id`` beats every interval, listing ``listed``."""
        self.listings[agent_id] = list(listed)
        self.synced[agent_id] = synced

    async def lose(self, agent_id: str) -> None:
        """``agent_id`` beats once and falls silent until declared lost; B lives on."""
        await self.beat(agent_id)
        self.live(B)
        await self.elapse(10 * INTERVAL_S)
        assert self.status(agent_id) == "LOST"

    def silence(self, agent_id: str) -> None:
        self.listings.pop(agent_id, None)

    async def elapse(self, seconds: float) -> None:
        """Time passes: live agents beat on schedule, the monitor sweeps every SWEEP_S."""
        for _ in range(round(seconds / SWEEP_S)):
            self.clock.advance(SWEEP_S)
            for agent_id, listed in self.listings.items():
                if self.clock() - self._last_beat.get(agent_id, -1e9) >= INTERVAL_S:
                    await self.beat(agent_id, *listed, synced=self.synced[agent_id])
            await self.monitor.sweep()

    # -------------------------------------------------------------------- runs

    async def submit(self, **fields: Any) -> uuid.UUID:
        submission = SubmitRun(run_id=uuid.uuid4(), image="busybox", queue="q", **fields)
        await self.store.create([submission])
        return submission.run_id

    async def launched(self, run_id: uuid.UUID, agent_id: str, attempt: int = 1) -> None:
        await self.store.apply_events(
            [
                RunLaunched(
                    run_id=run_id,
                    attempt=attempt,
                    agent_id=agent_id,
                    container_id=f"c{attempt}",
                    container_name=f"n{attempt}",
                )
            ]
        )

    async def started(self, run_id: uuid.UUID, agent_id: str, attempt: int = 1) -> None:
        await self.launched(run_id, agent_id, attempt)
        event = RunStarted(run_id=run_id, attempt=attempt, agent_id=agent_id, container_id="c")
        await self.store.apply_events([event])

    def run(self, run_id: uuid.UUID) -> FakeRun:
        return self.store.runs[run_id]

    def terminations(self, agent_id: str) -> list[tuple[uuid.UUID, int]]:
        """(run, attempt) of the TerminateRun messages waiting on ``agent_id``'s queue."""
        return [
            (item.message.run_id, item.message.attempt)
            for item in self.store.written(TerminateRun)
            if isinstance(item.message, TerminateRun) and item.routing_key == agent_id
        ]

    def launches(self, run_id: uuid.UUID) -> list[int]:
        return [
            item.message.attempt
            for item in self.store.written(LaunchRun)
            if isinstance(item.message, LaunchRun) and item.message.run_id == run_id
        ]

    def decisions(self) -> list[tuple[uuid.UUID, int, str]]:
        """The monitor's RunFailed decisions announced to followers: (run, attempt, reason)."""
        return [
            (item.message.run_id, item.message.attempt, item.message.reason.value)
            for item in self.store.written(RunFailed)
            if isinstance(item.message, RunFailed)
        ]

    def alerts(self, kind: str) -> int:
        return sum(1 for alert in self.store.alerts.values() if alert.kind == kind)

    def status(self, agent_id: str) -> str:
        return self.store.agents_by_id[agent_id].status


def state(run: FakeRun) -> tuple[RunState, int, str | None]:
    return run.state, run.attempt, run.failure_reason


# ---------------------------------------------------------------------- agent lost


async def test_an_agent_silent_too_long_is_lost_and_its_runs_retried() -> None:
    w = World(lost_after_beats=3)
    starting, running, other = await w.submit(), await w.submit(), await w.submit()
    await w.launched(starting, A)
    await w.started(running, A)
    await w.started(other, B)
    w.live(B, (other, 1))
    await w.beat(A, (starting, 1), (running, 1))  # its last
    await w.elapse(3 * INTERVAL_S)  # silent for 3 intervals: not yet more
    assert w.status(A) == "ALIVE"
    assert state(w.run(running)) == (RunState.STARTED, 1, None)

    await w.elapse(SWEEP_S)
    assert w.status(A) == "LOST"
    for run_id in (starting, running):
        assert state(w.run(run_id)) == (RunState.QUEUED, 2, "AGENT_LOST")
        assert w.launches(run_id) == [1, 2]
    # Its containers are told to stop should it come back; the other agent is untouched.
    assert sorted(w.terminations(A)) == sorted([(starting, 1), (running, 1)])
    assert w.status(B) == "ALIVE"
    assert state(w.run(other)) == (RunState.STARTED, 1, None)
    assert w.terminations(B) == []
    assert w.alerts("agent_down") == 1


async def test_an_agent_whose_engine_stops_answering_is_lost_though_it_beats() -> None:
    w = World(lost_after_beats=3)
    running, claimed = await w.submit(), await w.submit()
    await w.started(running, A)
    await w.store.apply_events([RunClaimed(run_id=claimed, attempt=1, agent_id=A)])
    w.live(A, (running, 1), (claimed, 1, "launching"))
    await w.elapse(4)
    w.engine_down.add(A)  # its dockerd froze: heartbeats go on, saying so
    await w.elapse(3 * INTERVAL_S)  # not yet past the threshold since the first such beat
    assert w.status(A) == "ALIVE"
    await w.elapse(2 * INTERVAL_S)
    assert w.status(A) == "LOST"
    # The started run and the one it claimed (its container being created) fail over.
    for run_id in (running, claimed):
        assert state(w.run(run_id)) == (RunState.QUEUED, 2, "AGENT_LOST")
    assert sorted(w.terminations(A)) == sorted([(running, 1), (claimed, 1)])
    [alert] = [a for a in w.store.alerts.values() if a.kind == "agent_down"]
    assert "its Docker engine has not answered" in alert.message
    assert "no answer to a ping in 5 s" in alert.message
    # Still beating with its engine down: still lost, no second alert.
    await w.elapse(10)
    assert (w.status(A), w.alerts("agent_down"), w.alerts("agent_back")) == ("LOST", 1, 0)
    # The engine answers again: back, and the superseded attempt it still runs is fenced.
    await w.started(running, B, attempt=2)
    w.engine_down.discard(A)
    w.live(A, (running, 1))
    await w.elapse(2)
    assert (w.status(A), w.alerts("agent_back")) == ("ALIVE", 1)
    assert decision_id(running, 1, f"fence:{A}") in w.store.outbox


async def test_a_claimed_run_its_agent_stops_listing_fails_as_vanished() -> None:
    w = World()
    run_id = await w.submit()
    await w.store.apply_events([RunClaimed(run_id=run_id, attempt=1, agent_id=A)])
    w.live(A)  # restarted since it claimed: it holds nothing
    await w.elapse(3 * INTERVAL_S + SWEEP_S)
    assert state(w.run(run_id)) == (RunState.QUEUED, 2, "UNEXPECTED_TERMINATION")


async def test_a_drained_agent_that_stops_leaves_quietly_but_one_with_runs_is_lost() -> None:
    w = World()
    run_id = await w.submit()
    await w.started(run_id, A)
    await w.beat(A, (run_id, 1, "running"), draining=True)
    await w.beat(A, (run_id, 1, "reported"), draining=True)  # the run finished; it stops
    await w.elapse(10 * INTERVAL_S)
    assert w.status(A) == "LEFT"
    assert w.alerts("agent_down") == 0
    # Another drains with a run still running, then goes quiet: lost, its run failed over.
    other = await w.submit()
    await w.started(other, "b")
    await w.beat("b", (other, 1, "running"), draining=True)
    await w.elapse(10 * INTERVAL_S)
    assert w.status("b") == "LOST"
    assert w.alerts("agent_down") == 1


async def test_a_run_claimed_by_an_agent_that_then_drains_away_fails_over() -> None:
    # A stops while its claim waits for an answer: it gives the launch back (to B, whose
    # claim is refused) and leaves, listing nothing; the claim, granted after, made it the
    # holder. Leaving, it gives the run up: retried, not QUEUED for ever.
    w = World()
    run_id = await w.submit()
    await w.beat(A)
    await w.store.apply_events([RunClaimed(run_id=run_id, attempt=1, agent_id=A)])
    await w.beat(A, draining=True)
    await w.elapse(10 * INTERVAL_S)
    assert w.status(A) == "LEFT"
    assert state(w.run(run_id)) == (RunState.QUEUED, 2, "AGENT_LOST")
    assert w.launches(run_id) == [1, 2]
    assert w.alerts("agent_down") == 0  # leaving is no incident


@pytest.mark.parametrize("how_far", ["claimed", "started"])
async def test_a_run_that_becomes_a_lost_agent_s_after_the_loss_fails_over(how_far: str) -> None:
    # The status store was behind: A's claim (and launch, start) is applied only after the
    # monitor declared A lost and failed over what A held then, which was nothing.
    w = World()
    run_id = await w.submit()
    await w.lose(A)
    await w.store.apply_events([RunClaimed(run_id=run_id, attempt=1, agent_id=A)])
    if how_far == "started":
        await w.started(run_id, A)
    # Not at once: an agent that is back says so within an interval.
    await w.elapse(3 * INTERVAL_S)
    assert state(w.run(run_id)) == (
        (RunState.QUEUED, 1, None) if how_far == "claimed" else (RunState.STARTED, 1, None)
    )
    await w.elapse(INTERVAL_S)
    assert state(w.run(run_id)) == (RunState.QUEUED, 2, "AGENT_LOST")
    assert (run_id, 1) in w.terminations(A)  # should it ever come back
    # Once: later sweeps take no second decision.
    await w.elapse(10 * SWEEP_S)
    assert w.decisions() == [(run_id, 1, "AGENT_LOST")]


async def test_an_agent_back_from_lost_keeps_what_it_claims_before_the_monitor_hears_it() -> None:
    # Back after a partition, A claims at once; its heartbeat reaches the monitor later.
    w = World()
    run_id = await w.submit()
    await w.lose(A)
    await w.store.apply_events([RunClaimed(run_id=run_id, attempt=1, agent_id=A)])
    await w.elapse(1.5)
    await w.started(run_id, A)
    w.live(A, (run_id, 1))
    await w.elapse(10 * INTERVAL_S)
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)
    assert w.decisions() == []


async def test_after_a_takeover_a_live_agent_still_lost_in_the_store_keeps_its_runs() -> None:
    # A came back while no monitor led (its return never written): the new leader's view
    # holds it lost until its first heartbeat, which comes within an interval.
    w = World()
    run_id = await w.submit()
    await w.lose(A)
    await w.started(run_id, A)
    w.monitor = w.new_monitor()
    await w.monitor.load()
    await w.monitor.sweep()
    w.live(A, (run_id, 1))
    await w.elapse(10 * INTERVAL_S)
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)
    assert w.decisions() == []


async def test_a_drained_agent_s_finished_run_waits_for_its_final_event_after_it_left() -> None:
    # A lists the run reported and leaves; the status store is behind with its success.
    w = World()
    run_id = await w.submit()
    await w.started(run_id, A)
    await w.beat(A, (run_id, 1, "reported"), draining=True)
    await w.elapse(10 * INTERVAL_S)
    assert w.status(A) == "LEFT"
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)
    await w.store.apply_events([RunSucceeded(run_id=run_id, attempt=1, agent_id=A)])
    assert w.run(run_id).state == RunState.SUCCESS
    assert w.decisions() == []


async def test_after_a_takeover_a_draining_agent_that_stops_leaves_and_its_success_counts() -> None:
    # The new leader reads A as DRAINING from the store: stopped, A leaves (it is not lost),
    # and its run, which it last listed finished, waits for its success on the way.
    w = World()
    run_id = await w.submit()
    await w.started(run_id, A)
    w.live(B)
    await w.beat(A, (run_id, 1, "reported"), draining=True)
    await w.elapse(SWEEP_S)
    assert w.status(A) == "DRAINING"
    w.monitor = w.new_monitor()
    await w.monitor.load()
    await w.elapse(10 * INTERVAL_S)
    assert w.status(A) == "LEFT"
    assert w.alerts("agent_down") == 0
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)
    await w.store.apply_events([RunSucceeded(run_id=run_id, attempt=1, agent_id=A)])
    assert w.run(run_id).state == RunState.SUCCESS
    assert w.decisions() == []


async def test_a_run_claimed_by_an_agent_lost_for_its_engine_fails_in_those_words() -> None:
    w = World()
    run_id = await w.submit()
    w.live(B)
    w.live(A)
    await w.elapse(INTERVAL_S)
    w.engine_down.add(A)
    await w.elapse(10 * INTERVAL_S)
    assert w.status(A) == "LOST"
    await w.store.apply_events([RunClaimed(run_id=run_id, attempt=1, agent_id=A)])
    await w.elapse(10 * INTERVAL_S)
    assert state(w.run(run_id)) == (RunState.QUEUED, 2, "AGENT_LOST")
    [failed] = [i.message for i in w.store.written(RunFailed)]
    assert isinstance(failed, RunFailed)
    assert failed.message == f"held by agent {A}, lost or gone: its Docker engine does not answer"


async def test_silence_is_counted_in_the_agent_s_own_intervals() -> None:
    w = World(lost_after_beats=3)
    await w.beat(A, interval_s=0.5)  # lost after 1.5 s
    await w.beat(B, interval_s=2.0)  # lost after 6 s
    await w.elapse(1.5)
    assert (w.status(A), w.status(B)) == ("ALIVE", "ALIVE")
    await w.elapse(0.5)
    assert (w.status(A), w.status(B)) == ("LOST", "ALIVE")
    await w.elapse(4)
    assert w.status(B) == "ALIVE"
    await w.elapse(0.5)
    assert w.status(B) == "LOST"


async def test_a_lost_agent_s_run_with_no_retry_left_fails() -> None:
    w = World()
    run_id = await w.submit(max_retries=0)
    await w.started(run_id, A)
    await w.beat(A, (run_id, 1))
    await w.elapse(10)
    assert state(w.run(run_id)) == (RunState.FAILURE, 1, "AGENT_LOST")
    assert w.launches(run_id) == [1]
    assert w.alerts("run_failed") == 1


async def test_an_agent_is_declared_lost_once_by_a_monitor_and_by_its_successor() -> None:
    w = World()
    run_id = await w.submit()
    await w.started(run_id, A)
    await w.beat(A, (run_id, 1))
    await w.elapse(30)
    # A standby takes over: it rebuilds its view from the store and sweeps.
    w.monitor = w.new_monitor()
    await w.monitor.load()
    await w.elapse(30)
    assert w.decisions() == [(run_id, 1, "AGENT_LOST")]
    assert w.terminations(A) == [(run_id, 1)]
    assert w.alerts("agent_down") == 1
    assert state(w.run(run_id)) == (RunState.QUEUED, 2, "AGENT_LOST")


# ------------------------------------------------------------- agent back, fencing


async def test_an_agent_back_from_lost_is_alerted_and_its_superseded_attempts_fenced() -> None:
    w = World()
    run_id = await w.submit()
    await w.started(run_id, A)
    w.live(A, (run_id, 1))
    await w.elapse(4)
    w.silence(A)  # frozen
    await w.elapse(8)
    assert w.status(A) == "LOST"
    await w.started(run_id, B, attempt=2)  # failed over to another agent
    w.live(B, (run_id, 2))
    await w.elapse(4)
    fence_id = decision_id(run_id, 1, f"fence:{A}")
    assert fence_id not in w.store.outbox

    w.live(A, (run_id, 1))  # thawed, still running attempt 1
    await w.elapse(2)
    assert w.status(A) == "ALIVE"
    assert w.alerts("agent_back") == 1
    assert fence_id in w.store.outbox
    assert w.store.outbox[fence_id].routing_key == A
    assert w.terminations(B) == []  # attempt 2 is the run's own
    assert state(w.run(run_id)) == (RunState.STARTED, 2, "AGENT_LOST")
    await w.elapse(30)
    assert w.alerts("agent_back") == 1
    assert w.status(A) == "ALIVE"


async def test_a_live_agent_is_fenced_on_its_first_heartbeat_and_every_tenth_after() -> None:
    w = World()
    early, late = await w.submit(), await w.submit()
    for run_id in (early, late):
        await w.started(run_id, A)
    # Failed over by an earlier monitor while A, which kept running them, was away.
    await w.store.fail_attempt(early, 1, FailureReason.AGENT_LOST, "lost")
    w.monitor = w.new_monitor()
    await w.monitor.load()
    await w.beat(A, (early, 1), (late, 1))  # its first heartbeat to this monitor
    assert w.terminations(A) == [(early, 1)]

    await w.store.fail_attempt(late, 1, FailureReason.AGENT_LOST, "lost")
    for _ in range(FENCE_EVERY - 1):  # heartbeats 2 to FENCE_EVERY
        await w.beat(A, (early, 1), (late, 1))
    assert w.terminations(A) == [(early, 1)]
    await w.beat(A, (early, 1), (late, 1))
    assert w.terminations(A) == [(early, 1), (late, 1)]


# ------------------------------------------------------------------ run vanished


async def test_a_run_missing_from_heartbeats_in_a_row_is_unexpected_termination() -> None:
    w = World(vanished_after_beats=3)
    run_id = await w.submit()
    await w.started(run_id, A)
    w.live(A, (run_id, 1))
    await w.elapse(4)
    w.live(A)  # its container is gone, with no final event
    await w.elapse(2 * INTERVAL_S)  # two heartbeats without it
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)
    await w.elapse(INTERVAL_S)  # the third
    assert state(w.run(run_id)) == (RunState.QUEUED, 2, "UNEXPECTED_TERMINATION")
    assert w.terminations(A) == [(run_id, 1)]
    assert w.decisions() == [(run_id, 1, "UNEXPECTED_TERMINATION")]


async def test_only_a_new_heartbeat_counts_a_run_missing_again() -> None:
    w = World(vanished_after_beats=3, lost_after_beats=100)
    run_id = await w.submit()
    await w.started(run_id, A)
    await w.beat(A)
    for _ in range(20):  # many sweeps, one heartbeat
        await w.elapse(SWEEP_S)
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)
    await w.beat(A)
    await w.monitor.sweep()
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)
    await w.beat(A)
    await w.monitor.sweep()
    assert state(w.run(run_id))[0] == RunState.QUEUED


async def test_a_run_listed_again_starts_the_count_over() -> None:
    w = World(vanished_after_beats=3)
    run_id = await w.submit()
    await w.started(run_id, A)
    for listed in ([], [], [(run_id, 1)], [], [], [(run_id, 1)], [], []):
        await w.beat(A, *listed)
        await w.monitor.sweep()
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)
    assert w.decisions() == []


async def test_the_monitor_forgets_runs_that_ended() -> None:
    """What it watched for missing from heartbeats is forgotten once the run ended: kept,
    every run it ever watched was an entry for as long as the monitor leads."""
    w = World(vanished_after_beats=3)
    run_ids = [await w.submit() for _ in range(20)]
    for run_id in run_ids:
        await w.started(run_id, A)
    w.live(A, *((run_id, 1) for run_id in run_ids))
    await w.elapse(2 * INTERVAL_S)
    assert len(w.monitor._suspicions) == 20
    await w.store.apply_events([RunSucceeded(run_id=r, attempt=1, agent_id=A) for r in run_ids])
    w.live(A)
    await w.elapse(2 * INTERVAL_S)
    assert [state(w.run(r)) for r in run_ids] == [(RunState.SUCCESS, 1, None)] * 20
    assert w.monitor._suspicions == {}


@pytest.mark.parametrize("listed_as", sorted(FINISHED_STATES))
async def test_a_run_listed_as_ended_is_waited_for_up_to_the_grace(listed_as: str) -> None:
    w = World(exited_grace_s=30, vanished_after_beats=3)
    run_id = await w.submit(max_retries=0)
    await w.started(run_id, A)
    w.live(A, (run_id, 1, listed_as))  # seen to end; its final event is late
    await w.elapse(31)  # 16 heartbeats, far more than vanished_after_beats; 30 s waited
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)
    await w.elapse(INTERVAL_S)
    assert state(w.run(run_id)) == (RunState.FAILURE, 1, "UNEXPECTED_TERMINATION")
    assert w.terminations(A) == [(run_id, 1)]


async def test_the_grace_is_waited_in_one_stretch() -> None:
    w = World(exited_grace_s=30, vanished_after_beats=3)
    run_id = await w.submit()
    await w.started(run_id, A)
    for listed in ((run_id, 1, "exited"), (run_id, 1), (run_id, 1, "exited")):
        w.live(A, listed)
        await w.elapse(20)
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)  # 18 s waited, this time
    await w.elapse(14)
    assert state(w.run(run_id)) == (RunState.QUEUED, 2, "UNEXPECTED_TERMINATION")


async def test_a_final_event_within_the_grace_wins() -> None:
    w = World(exited_grace_s=30)
    run_id = await w.submit()
    await w.started(run_id, A)
    w.live(A, (run_id, 1, "reported"))
    await w.elapse(20)
    await w.store.apply_events([RunSucceeded(run_id=run_id, attempt=1, agent_id=A)])
    w.live(A)
    await w.elapse(60)
    assert state(w.run(run_id)) == (RunState.SUCCESS, 1, None)
    assert w.decisions() == []
    assert w.terminations(A) == []


async def test_an_unsynced_agent_s_listing_is_not_trusted_until_it_adopts() -> None:
    w = World(vanished_after_beats=3)
    run_id = await w.submit()
    await w.started(run_id, A)
    w.live(A, synced=False)  # restarted, not yet through its containers
    await w.elapse(30)
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)
    w.live(A, synced=True)  # it has listed its containers: the run is not among them
    await w.elapse(3 * INTERVAL_S)
    assert state(w.run(run_id)) == (RunState.QUEUED, 2, "UNEXPECTED_TERMINATION")


async def test_after_a_takeover_no_run_is_missing_before_its_agent_has_beaten() -> None:
    w = World(vanished_after_beats=1)
    run_id = await w.submit()
    await w.started(run_id, A)
    await w.beat(A, (run_id, 1))
    w.monitor = w.new_monitor()
    await w.monitor.load()
    await w.monitor.sweep()
    await w.monitor.sweep()
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)
    await w.beat(A)  # synced, and the run is not listed
    await w.monitor.sweep()
    assert state(w.run(run_id)) == (RunState.QUEUED, 2, "UNEXPECTED_TERMINATION")


async def test_after_a_takeover_silence_is_measured_from_the_takeover() -> None:
    w = World(lost_after_beats=3)
    await w.beat(A)
    w.clock.advance(100)  # no monitor was active meanwhile
    w.monitor = w.new_monitor()
    await w.monitor.load()
    await w.elapse(6)
    assert w.status(A) == "ALIVE"
    await w.elapse(0.5)
    assert w.status(A) == "LOST"


async def test_after_a_takeover_an_agent_lost_before_is_back_with_its_first_heartbeat() -> None:
    w = World()
    run_id = await w.submit()
    await w.started(run_id, A)
    await w.beat(A, (run_id, 1))
    await w.elapse(10)
    assert w.status(A) == "LOST"
    w.monitor = w.new_monitor()
    await w.monitor.load()
    await w.elapse(2)  # sooner than the monitor would declare it lost itself
    await w.beat(A, (run_id, 1))
    assert w.status(A) == "ALIVE"
    assert w.alerts("agent_back") == 1
    assert decision_id(run_id, 1, f"fence:{A}") in w.store.outbox


# ------------------------------------------------------------- timeouts, long runs


async def test_a_run_queued_past_its_queue_timeout_fails_and_is_fenced_on_live_agents() -> None:
    w = World()
    patient, hasty = await w.submit(), await w.submit(queue_timeout_s=5)
    await w.beat(A)
    w.store.agents_by_id[A].queues = ("q",)  # A consumes the runs' queue: it gets the fence
    await w.elapse(5.5)
    assert state(w.run(hasty)) == (RunState.FAILURE, 1, "QUEUE_TIMEOUT")
    assert state(w.run(patient)) == (RunState.QUEUED, 1, None)
    assert w.decisions() == [(hasty, 1, "QUEUE_TIMEOUT")]
    assert w.terminations(A) == [(hasty, 1)]


@pytest.mark.parametrize("retried", [False, True])
async def test_a_claimed_run_past_its_queue_timeout_is_stopped_on_its_claimant(
    retried: bool,
) -> None:
    # A claimed it just before the timeout and is creating its container; A is draining,
    # so it is no live agent of the queue, and only its claim says it may start it.
    w = World()
    retry = {"retry_on": (FailureReason.QUEUE_TIMEOUT,), "max_retries": 1} if retried else {}
    run_id = await w.submit(queue_timeout_s=30, **retry)
    await w.store.apply_events([RunClaimed(run_id=run_id, attempt=1, agent_id=A)])
    for _ in range(16):
        await w.beat(A, (run_id, 1, "created"), draining=True)
        await w.elapse(INTERVAL_S)
    assert state(w.run(run_id))[:2] == ((RunState.QUEUED, 2) if retried else (RunState.FAILURE, 1))
    assert w.terminations(A) == [(run_id, 1)]


async def test_runs_waiting_on_a_queue_no_live_agent_consumes_are_alerted_once() -> None:
    w = World(unserved_after_s=60)
    first, _ = await w.submit(), await w.submit()
    await w.elapse(61)
    assert w.alerts("queue_unserved") == 1
    await w.elapse(60)
    assert w.alerts("queue_unserved") == 1  # the same oldest run: the same incident
    # Once the oldest leaves the queue, a run still waiting is a new incident.
    w.run(first).state = RunState.CANCELED
    await w.elapse(SWEEP_S * 10)
    assert w.alerts("queue_unserved") == 2


async def test_a_cancel_its_agent_does_not_confirm_ends_cancel_timeout_never_retried() -> None:
    w = World(cancel_confirm_s=30)
    run_id = await w.submit(max_retries=5, retry_on=("CANCEL_TIMEOUT",))
    await w.started(run_id, A)
    w.live(A, (run_id, 1, "running"))
    run = w.run(run_id)
    run.state, run.cancel_grace_s, run.state_changed_at = RunState.CANCELING, 10.0, w.clock()
    await w.elapse(39)
    assert state(w.run(run_id)) == (RunState.CANCELING, 1, None)
    await w.elapse(1.5)
    assert state(w.run(run_id)) == (RunState.CANCELED, 1, "CANCEL_TIMEOUT")
    assert w.decisions() == [(run_id, 1, "CANCEL_TIMEOUT")]
    assert w.launches(run_id) == [1]  # no retry, whatever its policy says
    assert w.alerts("run_failed") == 0


async def test_a_run_starting_for_too_long_fails_start_timeout_and_is_terminated() -> None:
    w = World(start_timeout_s=180)
    run_id = await w.submit()
    await w.launched(run_id, A)
    w.live(A, (run_id, 1, "created"))
    await w.elapse(180)
    assert state(w.run(run_id)) == (RunState.STARTING, 1, None)
    await w.elapse(SWEEP_S)
    # START_TIMEOUT is not retried by the default policy.
    assert state(w.run(run_id)) == (RunState.FAILURE, 1, "START_TIMEOUT")
    assert w.terminations(A) == [(run_id, 1)]
    assert w.alerts("run_failed") == 1


async def test_a_run_s_own_start_timeout_comes_before_the_default() -> None:
    w = World(start_timeout_s=180)
    run_id = await w.submit(start_timeout_s=5)
    await w.launched(run_id, A)
    w.live(A, (run_id, 1, "created"))
    await w.elapse(5.5)
    assert state(w.run(run_id)) == (RunState.FAILURE, 1, "START_TIMEOUT")


async def test_a_run_past_its_max_runtime_fails_and_is_terminated() -> None:
    w = World()
    limited, unlimited = await w.submit(max_runtime_s=10), await w.submit()
    await w.started(limited, A)
    await w.started(unlimited, A)
    w.live(A, (limited, 1), (unlimited, 1))
    await w.elapse(10)
    assert state(w.run(limited)) == (RunState.STARTED, 1, None)
    await w.elapse(SWEEP_S)
    assert state(w.run(limited)) == (RunState.FAILURE, 1, "MAX_RUNTIME")
    assert w.terminations(A) == [(limited, 1)]
    await w.elapse(600)
    assert state(w.run(unlimited)) == (RunState.STARTED, 1, None)


async def test_a_long_running_run_is_alerted_once_and_left_running() -> None:
    w = World(long_running_s=60)
    run_id = await w.submit()
    await w.started(run_id, A)
    w.live(A, (run_id, 1))
    await w.elapse(60)
    assert w.alerts("run_running_long") == 0
    await w.elapse(SWEEP_S)
    assert w.alerts("run_running_long") == 1
    await w.elapse(300)
    assert w.alerts("run_running_long") == 1
    assert state(w.run(run_id)) == (RunState.STARTED, 1, None)
    assert w.terminations(A) == []


async def test_two_monitors_taking_the_same_decision_take_it_once() -> None:
    w = World(start_timeout_s=5)
    run_id = await w.submit()
    await w.launched(run_id, A)
    other = w.new_monitor()
    await w.beat(A, (run_id, 1, "created"))
    w.clock.advance(6)
    await w.monitor.sweep()
    await other.sweep()
    assert w.decisions() == [(run_id, 1, "START_TIMEOUT")]
    assert w.terminations(A) == [(run_id, 1)]
    assert w.alerts("run_failed") == 1


async def test_a_monitor_cut_off_from_the_broker_judges_no_agent_on_its_own_silence() -> None:
    """While the monitor's connection is away, agents' heartbeats wait in its queue: the
    silence it sees is its own. Once it hears again, silence counts from then on."""
    w = World(lost_after_beats=3)
    running = await w.submit()
    await w.started(running, A)
    w.live(A, (running, 1))
    await w.elapse(INTERVAL_S)
    w.monitor.deaf()
    w.silence(A)  # its beats no longer reach the monitor
    await w.elapse(10 * INTERVAL_S)
    assert w.status(A) == "ALIVE"
    assert state(w.run(running)) == (RunState.STARTED, 1, None)
    w.monitor.hearing_again()
    w.live(A, (running, 1))  # what waited in the queue, and what follows
    await w.elapse(5 * INTERVAL_S)
    assert w.status(A) == "ALIVE"
    assert state(w.run(running)) == (RunState.STARTED, 1, None)
    # An agent that died during the outage is lost one threshold after the monitor hears.
    w.monitor.deaf()
    w.silence(A)
    await w.elapse(10 * INTERVAL_S)
    w.monitor.hearing_again()
    await w.elapse(3 * INTERVAL_S)
    assert w.status(A) == "ALIVE"
    await w.elapse(2 * SWEEP_S)
    assert w.status(A) == "LOST"
    assert state(w.run(running)) == (RunState.QUEUED, 2, "AGENT_LOST")
