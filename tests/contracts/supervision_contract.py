"""The contract of ``dispatcher.ports.SupervisionStore``, for every implementation.

Each check is a plain function of a ``Harness``: the store under test, with ways to seed it
as the control plane does (runs created, events applied as agents report them), to let time
pass, and to read back what a user would see (a run's state, an agent's status, the
TerminateRun and LaunchRun messages waiting in the outbox, the alerts). The unit suite runs
them against ``tests/fakes/supervision.py``, the integration suite against
``store.Supervision`` on PostgreSQL (``tests/integration/test_supervision_contract.py``).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dispatcher.ports import SupervisionStore
from dispatcher.states import RunState
from schemas import (
    AgentHeartbeat,
    ContainerState,
    Event,
    FailureReason,
    RunClaimed,
    RunLaunched,
    RunStarted,
    RunSucceeded,
    SubmitRun,
)

AGENT_A = "agent-a"
AGENT_B = "agent-b"
#: Slack for the real store: its clock is PostgreSQL's and runs while the test does.
SLACK_S = 5.0


@dataclass(frozen=True)
class RunSeen:
    """What the store holds of a run, as an operator would read it."""

    state: RunState
    attempt: int
    agent_id: str | None
    failure_reason: str | None


class Harness(Protocol):
    """One implementation of the store, seeded and read back by its own means."""

    @property
    def store(self) -> SupervisionStore: ...

    async def submit(self, submission: SubmitRun) -> None:
        """Create a QUEUED run (and its first LaunchRun)."""
        ...

    async def report(self, *events: Event) -> None:
        """Apply events as the control plane applies what agents report."""
        ...

    async def elapse(self, seconds: float) -> None:
        """Let ``seconds`` pass for every time the store has recorded."""
        ...

    async def run(self, run_id: uuid.UUID) -> RunSeen: ...

    async def agent_status(self, agent_id: str) -> str | None: ...

    async def terminations(self) -> list[tuple[str, uuid.UUID, int]]:
        """(agent's queue, run, attempt) of every TerminateRun written, oldest first."""
        ...

    async def launches(self, run_id: uuid.UUID) -> list[int]:
        """The attempts of ``run_id`` a LaunchRun was written for, oldest first."""
        ...

    async def alert_kinds(self) -> list[str]:
        """The kind of every alert raised, sorted."""
        ...


# ------------------------------------------------------------------- seeding helpers


async def submit(h: Harness, **fields: Any) -> uuid.UUID:
    submission = SubmitRun(
        run_id=uuid.uuid4(), image="busybox", command=("sleep", "60"), queue="q", **fields
    )
    await h.submit(submission)
    return submission.run_id


async def launched(h: Harness, run_id: uuid.UUID, agent_id: str, attempt: int = 1) -> None:
    await h.report(
        RunLaunched(
            run_id=run_id,
            attempt=attempt,
            agent_id=agent_id,
            container_id=f"c{attempt}",
            container_name=f"hd-{run_id}-{attempt}",
        )
    )


async def started(h: Harness, run_id: uuid.UUID, agent_id: str, attempt: int = 1) -> None:
    await launched(h, run_id, agent_id, attempt)
    await h.report(
        RunStarted(run_id=run_id, attempt=attempt, agent_id=agent_id, container_id=f"c{attempt}")
    )


async def beat(h: Harness, agent_id: str, interval_s: float = 2.0) -> None:
    await h.report(AgentHeartbeat(agent_id=agent_id, sequence=0, interval_s=interval_s))


def listing(*attempts: tuple[uuid.UUID, int], state: str = "running") -> list[ContainerState]:
    return [ContainerState(run_id=r, attempt=a, state=state) for r, a in attempts]


# -------------------------------------------------------------------------- reads


async def active_runs_are_the_starting_and_started_ones(h: Harness) -> None:
    queued = await submit(h)
    starting = await submit(h, start_timeout_s=5.0)
    running = await submit(h, max_runtime_s=60.0)
    ended = await submit(h)
    await launched(h, starting, AGENT_A)
    await started(h, running, AGENT_B)
    await started(h, ended, AGENT_A)
    await h.report(RunSucceeded(run_id=ended, attempt=1, agent_id=AGENT_A))

    active = {r.run_id: r for r in await h.store.active_runs()}
    assert queued not in active and ended not in active
    assert set(active) == {starting, running}
    first, second = active[starting], active[running]
    assert (first.state, first.attempt, first.agent_id) == (RunState.STARTING, 1, AGENT_A)
    assert (first.start_timeout_s, first.max_runtime_s, first.running_s) == (5.0, None, None)
    assert (second.state, second.agent_id, second.max_runtime_s) == (RunState.STARTED, AGENT_B, 60)
    assert second.running_s is not None


async def times_in_state_and_running_grow_as_time_passes(h: Harness) -> None:
    starting = await submit(h)
    running = await submit(h)
    await launched(h, starting, AGENT_A)
    await started(h, running, AGENT_A)
    await h.elapse(30)
    active = {r.run_id: r for r in await h.store.active_runs()}
    assert 30 <= active[starting].in_state_s < 30 + SLACK_S
    assert active[starting].running_s is None
    assert 30 <= active[running].in_state_s < 30 + SLACK_S
    assert 30 <= (active[running].running_s or 0) < 30 + SLACK_S


async def agents_report_status_interval_and_silence(h: Harness) -> None:
    assert await h.store.agents() == []
    await beat(h, AGENT_A, interval_s=0.5)
    await beat(h, AGENT_B)
    await h.elapse(10)
    await beat(h, AGENT_B, interval_s=3.0)  # heard again: its silence starts over
    rows = {a.agent_id: a for a in await h.store.agents()}
    assert (rows[AGENT_A].status, rows[AGENT_A].interval_s) == ("ALIVE", 0.5)
    assert (rows[AGENT_B].status, rows[AGENT_B].interval_s) == ("ALIVE", 3.0)
    assert 10 <= rows[AGENT_A].silent_s < 10 + SLACK_S
    assert 0 <= rows[AGENT_B].silent_s < SLACK_S


# --------------------------------------------------------------------- fail_attempt


async def a_retried_failure_queues_the_next_attempt_once(h: Harness) -> None:
    run_id = await submit(h)  # the default policy retries UNEXPECTED_TERMINATION twice
    await started(h, run_id, AGENT_A)
    reason = FailureReason.UNEXPECTED_TERMINATION
    assert await h.store.fail_attempt(run_id, 1, reason, "gone", terminate_on=AGENT_A)
    assert await h.run(run_id) == RunSeen(RunState.QUEUED, 2, None, "UNEXPECTED_TERMINATION")
    assert await h.launches(run_id) == [1, 2]
    assert await h.terminations() == [(AGENT_A, run_id, 1)]

    # The same decision again (a second monitor, a restart): nothing more.
    assert not await h.store.fail_attempt(run_id, 1, reason, "gone", terminate_on=AGENT_A)
    assert await h.run(run_id) == RunSeen(RunState.QUEUED, 2, None, "UNEXPECTED_TERMINATION")
    assert await h.launches(run_id) == [1, 2]
    assert await h.terminations() == [(AGENT_A, run_id, 1)]
    assert await h.alert_kinds() == []
    assert await h.store.active_runs() == []


async def a_failure_its_policy_does_not_retry_is_final(h: Harness) -> None:
    run_id = await submit(h)  # START_TIMEOUT is not in the default retry_on
    await launched(h, run_id, AGENT_A)
    reason = FailureReason.START_TIMEOUT
    assert await h.store.fail_attempt(run_id, 1, reason, "slow", terminate_on=AGENT_A)
    assert await h.run(run_id) == RunSeen(RunState.FAILURE, 1, AGENT_A, "START_TIMEOUT")
    assert await h.launches(run_id) == [1]
    assert await h.terminations() == [(AGENT_A, run_id, 1)]
    assert await h.alert_kinds() == ["run_failed"]
    assert not await h.store.fail_attempt(run_id, 1, reason, "slow", terminate_on=AGENT_A)
    assert await h.terminations() == [(AGENT_A, run_id, 1)]
    assert await h.alert_kinds() == ["run_failed"]


async def retries_stop_at_the_policy_s_maximum(h: Harness) -> None:
    run_id = await submit(h, max_retries=1, retry_on=(FailureReason.MAX_RUNTIME,))
    await started(h, run_id, AGENT_A)
    reason = FailureReason.MAX_RUNTIME
    assert await h.store.fail_attempt(run_id, 1, reason, "too long", terminate_on=AGENT_A)
    assert await h.run(run_id) == RunSeen(RunState.QUEUED, 2, None, "MAX_RUNTIME")
    await started(h, run_id, AGENT_B, attempt=2)
    assert await h.run(run_id) == RunSeen(RunState.STARTED, 2, AGENT_B, "MAX_RUNTIME")
    assert await h.store.fail_attempt(run_id, 2, reason, "too long", terminate_on=AGENT_B)
    assert await h.run(run_id) == RunSeen(RunState.FAILURE, 2, AGENT_B, "MAX_RUNTIME")
    assert await h.launches(run_id) == [1, 2]
    assert await h.terminations() == [(AGENT_A, run_id, 1), (AGENT_B, run_id, 2)]


async def a_decision_on_another_attempt_or_run_changes_nothing(h: Harness) -> None:
    run_id = await submit(h)
    await started(h, run_id, AGENT_A)
    reason = FailureReason.UNEXPECTED_TERMINATION
    assert not await h.store.fail_attempt(run_id, 2, reason, "not yet", terminate_on=AGENT_A)
    assert not await h.store.fail_attempt(uuid.uuid4(), 1, reason, "none", terminate_on=AGENT_A)
    assert await h.run(run_id) == RunSeen(RunState.STARTED, 1, AGENT_A, None)
    assert await h.terminations() == []


async def an_ended_run_is_not_failed(h: Harness) -> None:
    run_id = await submit(h)
    await started(h, run_id, AGENT_A)
    await h.report(RunSucceeded(run_id=run_id, attempt=1, agent_id=AGENT_A))
    reason = FailureReason.AGENT_LOST
    assert not await h.store.fail_attempt(run_id, 1, reason, "late", terminate_on=AGENT_A)
    assert await h.run(run_id) == RunSeen(RunState.SUCCESS, 1, AGENT_A, None)
    assert await h.terminations() == []
    assert await h.launches(run_id) == [1]


async def without_terminate_on_no_terminate_run_is_written(h: Harness) -> None:
    run_id = await submit(h)
    await started(h, run_id, AGENT_A)
    assert await h.store.fail_attempt(run_id, 1, FailureReason.AGENT_LOST, "gone")
    assert (await h.run(run_id)).attempt == 2
    assert await h.terminations() == []


async def events_of_another_agent_or_attempt_do_not_move_a_run(h: Harness) -> None:
    run_id = await submit(h)
    await launched(h, run_id, AGENT_A)
    await h.report(RunStarted(run_id=run_id, attempt=1, agent_id=AGENT_B, container_id="x"))
    await h.report(RunStarted(run_id=run_id, attempt=2, agent_id=AGENT_A, container_id="x"))
    assert await h.run(run_id) == RunSeen(RunState.STARTING, 1, AGENT_A, None)


async def an_event_is_applied_once_even_when_it_came_too_early(h: Harness) -> None:
    run_id = await submit(h)
    await started(h, run_id, AGENT_A)
    early = RunLaunched(
        run_id=run_id, attempt=2, agent_id=AGENT_B, container_id="c2", container_name="n2"
    )
    await h.report(early)  # about an attempt that does not exist yet: recorded, not applied
    assert await h.store.fail_attempt(run_id, 1, FailureReason.AGENT_LOST, "gone")
    await h.report(early)  # the same event again, now that attempt 2 is the run's
    assert await h.run(run_id) == RunSeen(RunState.QUEUED, 2, None, "AGENT_LOST")


# ------------------------------------------------------------------- agents lost, back


async def a_lost_agent_s_runs_fail_over_once(h: Harness) -> None:
    await beat(h, AGENT_A)
    await beat(h, AGENT_B)
    starting = await submit(h)
    running = await submit(h)
    final = await submit(h, max_retries=0)
    elsewhere = await submit(h)
    queued = await submit(h)
    await launched(h, starting, AGENT_A)
    await started(h, running, AGENT_A)
    await started(h, final, AGENT_A)
    await started(h, elsewhere, AGENT_B)

    failed = await h.store.declare_agent_lost(AGENT_A, 7.5)
    assert sorted(failed) == sorted([starting, running, final])
    assert await h.agent_status(AGENT_A) == "LOST"
    assert await h.agent_status(AGENT_B) == "ALIVE"
    for run_id in (starting, running):
        assert await h.run(run_id) == RunSeen(RunState.QUEUED, 2, None, "AGENT_LOST")
        assert await h.launches(run_id) == [1, 2]
    assert await h.run(final) == RunSeen(RunState.FAILURE, 1, AGENT_A, "AGENT_LOST")
    assert await h.run(elsewhere) == RunSeen(RunState.STARTED, 1, AGENT_B, None)
    assert await h.run(queued) == RunSeen(RunState.QUEUED, 1, None, None)
    assert sorted(await h.terminations()) == sorted(
        [(AGENT_A, starting, 1), (AGENT_A, running, 1), (AGENT_A, final, 1)]
    )
    assert await h.alert_kinds() == ["agent_down", "run_failed"]

    # Declared lost again (a second monitor): nothing changes.
    assert await h.store.declare_agent_lost(AGENT_A, 9.0) == []
    assert len(await h.terminations()) == 3
    assert await h.alert_kinds() == ["agent_down", "run_failed"]


async def only_a_known_alive_agent_is_declared_lost(h: Harness) -> None:
    assert await h.store.declare_agent_lost("nobody", 10.0) == []
    assert await h.agent_status("nobody") is None
    assert await h.alert_kinds() == []


async def an_agent_never_heard_from_that_holds_a_run_is_declared_lost(h: Harness) -> None:
    run_id = await submit(h)
    await started(h, run_id, "silent")
    assert await h.agent_status("silent") is None
    assert await h.store.declare_agent_lost("silent", 6.5) == [run_id]
    assert await h.agent_status("silent") == "LOST"


async def an_agent_comes_back_once_per_incident(h: Harness) -> None:
    await beat(h, AGENT_A)
    assert not await h.store.agent_back(AGENT_A)  # never lost
    assert not await h.store.agent_back("nobody")
    assert await h.store.declare_agent_lost(AGENT_A, 6.5) == []
    await beat(h, AGENT_A)  # a heartbeat alone does not make it ALIVE: the monitor does
    assert await h.agent_status(AGENT_A) == "LOST"
    assert await h.store.agent_back(AGENT_A)
    assert await h.agent_status(AGENT_A) == "ALIVE"
    assert not await h.store.agent_back(AGENT_A)
    assert await h.alert_kinds() == ["agent_back", "agent_down"]

    # Lost and back again: a new incident, alerted again.
    assert await h.store.declare_agent_lost(AGENT_A, 6.5) == []
    assert await h.store.agent_back(AGENT_A)
    assert await h.alert_kinds() == ["agent_back", "agent_back", "agent_down", "agent_down"]


async def a_drained_agent_leaves_quietly_and_only_a_draining_one(h: Harness) -> None:
    await h.report(AgentHeartbeat(agent_id=AGENT_A, sequence=0, interval_s=2.0, draining=True))
    assert await h.agent_status(AGENT_A) == "DRAINING"
    assert await h.store.agent_left(AGENT_A)
    assert await h.agent_status(AGENT_A) == "LEFT"
    assert not await h.store.agent_left(AGENT_A)
    assert await h.alert_kinds() == []
    await beat(h, AGENT_A)  # it beats again, not draining: ALIVE, and it does not leave
    assert await h.agent_status(AGENT_A) == "ALIVE"
    assert not await h.store.agent_left(AGENT_A)
    # A draining agent can still be lost (it stopped beating with runs in flight).
    await h.report(AgentHeartbeat(agent_id=AGENT_A, sequence=1, interval_s=2.0, draining=True))
    assert await h.store.declare_agent_lost(AGENT_A, 7.0) == []
    assert await h.agent_status(AGENT_A) == "LOST"
    assert await h.alert_kinds() == ["agent_down"]


async def a_claimed_run_past_its_queue_timeout_is_stopped_on_its_claimant(h: Harness) -> None:
    # Its claimant drains (no live agent of the queue): only its claim says it may start it.
    ended, retried = (
        await submit(h, queue_timeout_s=1),
        await submit(h, queue_timeout_s=1, retry_on=(FailureReason.QUEUE_TIMEOUT,), max_retries=1),
    )
    await h.report(AgentHeartbeat(agent_id=AGENT_A, sequence=0, interval_s=2.0, draining=True))
    for run_id in (ended, retried):
        await h.report(RunClaimed(run_id=run_id, attempt=1, agent_id=AGENT_A))
    await h.elapse(2 + SLACK_S)
    overdue = await h.store.overdue_queued()
    assert {w.run_id for w in overdue} == {ended, retried}
    for waiting in overdue:
        assert await h.store.time_out_queued(waiting, "still QUEUED after its queue timeout")
    seen = await h.run(ended)
    assert (seen.state, seen.attempt, seen.failure_reason) == (RunState.FAILURE, 1, "QUEUE_TIMEOUT")
    assert (await h.run(retried)).attempt == 2
    stopped = {(agent, run_id, attempt) for agent, run_id, attempt in await h.terminations()}
    assert {(AGENT_A, ended, 1), (AGENT_A, retried, 1)} <= stopped


# ---------------------------------------------------------------------------- fencing


async def fencing_terminates_attempts_that_are_no_longer_their_run_s(h: Harness) -> None:
    await beat(h, AGENT_A)
    moved_on = await submit(h)  # failed over to attempt 2 while its agent was away
    ended = await submit(h, max_retries=0)  # failed for good while its agent was away
    current = await submit(h)
    exited = await submit(h)
    for run_id in (moved_on, ended, current, exited):
        await started(h, run_id, AGENT_A)
    assert sorted(await h.store.declare_agent_lost(AGENT_A, 6.5)) == sorted(
        [moved_on, ended, current, exited]
    )
    await started(h, current, AGENT_A, attempt=2)  # the same agent took attempt 2
    await started(h, exited, AGENT_B, attempt=2)
    before = len(await h.terminations())

    shown = [
        *listing((moved_on, 1), (ended, 1), (current, 2), (uuid.uuid4(), 1)),
        *listing((exited, 1), state="exited"),
    ]
    assert await h.store.fence(AGENT_A, shown) == 2
    written = (await h.terminations())[before:]
    assert sorted(written) == sorted([(AGENT_A, moved_on, 1), (AGENT_A, ended, 1)])
    # Fenced again (every tenth heartbeat, a second monitor): nothing more.
    assert await h.store.fence(AGENT_A, shown) == 0
    assert len(await h.terminations()) == before + 2
    # Each agent's queue gets its own: the same attempt listed by another agent is fenced there.
    assert await h.store.fence(AGENT_B, listing((moved_on, 1))) == 1
    assert (await h.terminations())[-1] == (AGENT_B, moved_on, 1)
    assert await h.store.fence(AGENT_A, []) == 0


async def a_long_running_alert_is_raised_once_per_attempt(h: Harness) -> None:
    run_id = await submit(h)
    await started(h, run_id, AGENT_A)
    [run] = await h.store.active_runs()
    assert await h.store.alert_long_running(run, 60.0)
    assert not await h.store.alert_long_running(run, 60.0)
    assert await h.alert_kinds() == ["run_running_long"]
    assert await h.run(run_id) == RunSeen(RunState.STARTED, 1, AGENT_A, None)


Check = Callable[[Harness], Awaitable[None]]

#: Every check of the contract, for ``pytest.mark.parametrize``.
CHECKS: tuple[Check, ...] = (
    active_runs_are_the_starting_and_started_ones,
    times_in_state_and_running_grow_as_time_passes,
    agents_report_status_interval_and_silence,
    a_retried_failure_queues_the_next_attempt_once,
    a_failure_its_policy_does_not_retry_is_final,
    retries_stop_at_the_policy_s_maximum,
    a_decision_on_another_attempt_or_run_changes_nothing,
    an_ended_run_is_not_failed,
    without_terminate_on_no_terminate_run_is_written,
    events_of_another_agent_or_attempt_do_not_move_a_run,
    an_event_is_applied_once_even_when_it_came_too_early,
    a_lost_agent_s_runs_fail_over_once,
    only_a_known_alive_agent_is_declared_lost,
    an_agent_never_heard_from_that_holds_a_run_is_declared_lost,
    an_agent_comes_back_once_per_incident,
    a_drained_agent_leaves_quietly_and_only_a_draining_one,
    a_claimed_run_past_its_queue_timeout_is_stopped_on_its_claimant,
    fencing_terminates_attempts_that_are_no_longer_their_run_s,
    a_long_running_alert_is_raised_once_per_attempt,
)
