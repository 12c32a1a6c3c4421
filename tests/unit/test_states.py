"""The run state machine."""

from __future__ import annotations

import uuid

import pytest

from dispatcher.states import TERMINAL, RunState, can_transition, next_state
from schemas import AgentHeartbeat, FailureReason, RunFailed, RunLaunched, RunStarted, RunSucceeded

RUN = uuid.uuid4()
LAUNCHED = RunLaunched(run_id=RUN, attempt=1, agent_id="a", container_id="c", container_name="n")
STARTED = RunStarted(run_id=RUN, attempt=1, agent_id="a", container_id="c")
SUCCEEDED = RunSucceeded(run_id=RUN, attempt=1, agent_id="a")
FAILED = RunFailed(run_id=RUN, attempt=1, reason=FailureReason.EXIT_CODE, exit_code=3)


def test_the_happy_path() -> None:
    state = RunState.QUEUED
    for event, expected in [
        (LAUNCHED, RunState.STARTING),
        (STARTED, RunState.STARTED),
        (SUCCEEDED, RunState.SUCCESS),
    ]:
        new = next_state(state, event)
        assert new == expected
        state = new


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
@pytest.mark.parametrize("event", [LAUNCHED, STARTED, SUCCEEDED, FAILED])
def test_terminal_states_never_change(terminal: RunState, event: object) -> None:
    assert next_state(terminal, event) is None  # type: ignore[arg-type]


def test_events_that_overtake_others_still_move_forward() -> None:
    # A fast run's end can be applied before its start was seen.
    assert next_state(RunState.QUEUED, SUCCEEDED) == RunState.SUCCESS
    assert next_state(RunState.STARTING, FAILED) == RunState.FAILURE
    # ...but a late start never moves a run back.
    assert next_state(RunState.STARTED, LAUNCHED) is None


def test_a_repeated_event_changes_nothing() -> None:
    assert next_state(RunState.STARTED, STARTED) is None


def test_heartbeats_move_no_run() -> None:
    beat = AgentHeartbeat(agent_id="a", sequence=1)
    assert next_state(RunState.STARTED, beat) is None


def test_cancellation_paths_exist() -> None:
    assert can_transition(RunState.QUEUED, RunState.CANCELED)
    assert can_transition(RunState.STARTED, RunState.CANCELING)
    assert can_transition(RunState.CANCELING, RunState.CANCELED)
    assert not can_transition(RunState.STARTED, RunState.QUEUED)


def test_any_failure_of_a_canceling_run_cancels_it_and_a_success_first_stays() -> None:
    run_id = uuid.uuid4()
    for reason in (FailureReason.EXIT_CODE, FailureReason.AGENT_LOST, FailureReason.CANCEL_TIMEOUT):
        failed = RunFailed(run_id=run_id, attempt=1, reason=reason)
        assert next_state(RunState.CANCELING, failed) == RunState.CANCELED
    succeeded = RunSucceeded(run_id=run_id, attempt=1, agent_id="a")
    assert next_state(RunState.CANCELING, succeeded) == RunState.SUCCESS
