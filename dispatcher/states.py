"""The run state machine: the one place that says which transitions exist.

```
QUEUED ──▶ STARTING ──▶ STARTED ──▶ SUCCESS | FAILURE
   │           │            │
   └▶ CANCELED └──▶ CANCELING ◀┘ ──▶ CANCELED (any failure) | SUCCESS
```

A cancel moves QUEUED to CANCELED and STARTING or STARTED to CANCELING
(``store.cancellation``); events do the rest.

Terminal states never change. Events may overtake each other (a fast run's RunSucceeded can
be applied before its RunStarted was seen), so a later state may be reached directly from
an earlier one; a state is never left for an earlier one.
"""

from __future__ import annotations

import enum

from schemas import Message, RunFailed, RunLaunched, RunStarted, RunSucceeded


class RunState(enum.StrEnum):
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    STARTED = "STARTED"
    CANCELING = "CANCELING"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELED = "CANCELED"


TERMINAL = frozenset({RunState.SUCCESS, RunState.FAILURE, RunState.CANCELED})

_ALLOWED: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset(
        {RunState.STARTING, RunState.STARTED, RunState.SUCCESS, RunState.FAILURE, RunState.CANCELED}
    ),
    RunState.STARTING: frozenset(
        {RunState.STARTED, RunState.SUCCESS, RunState.FAILURE, RunState.CANCELING}
    ),
    RunState.STARTED: frozenset({RunState.SUCCESS, RunState.FAILURE, RunState.CANCELING}),
    RunState.CANCELING: frozenset({RunState.CANCELED, RunState.FAILURE, RunState.SUCCESS}),
    RunState.SUCCESS: frozenset(),
    RunState.FAILURE: frozenset(),
    RunState.CANCELED: frozenset(),
}


def can_transition(current: RunState, target: RunState) -> bool:
    """Whether ``current`` may become ``target``."""
    return target in _ALLOWED[current]


def target_state(event: Message) -> RunState | None:
    """The state a run event moves its attempt to, or None for events that move nothing."""
    if isinstance(event, RunLaunched):
        return RunState.STARTING
    if isinstance(event, RunStarted):
        return RunState.STARTED
    if isinstance(event, RunSucceeded):
        return RunState.SUCCESS
    if isinstance(event, RunFailed):
        return RunState.FAILURE
    return None


def next_state(current: RunState, event: Message) -> RunState | None:
    """The state after applying ``event`` to a run in ``current``; None when it changes nothing.

    A failure of a CANCELING run (the stop asked for, its agent lost, no confirmation in
    time) cancels it: never a FAILURE, never retried."""
    target = target_state(event)
    if target == RunState.FAILURE and current == RunState.CANCELING:
        target = RunState.CANCELED
    if target is None or target == current or not can_transition(current, target):
        return None
    return target
