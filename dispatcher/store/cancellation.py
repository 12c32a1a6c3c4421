"""Cancellation: a run is stopped where it is, in one transaction.

- QUEUED: CANCELED at once. Its LaunchRun rows not yet sent are dropped; one already sent
  (or being published by the relay it was handed to, ``OutboxRelay.hand_off``) may sit in an
  agent's queue or be held by an agent waiting for a slot, so every live agent of the run's
  queue gets a TerminateRun for the attempt on its own control queue, which fences it there:
  the launch is dropped, never started. An agent that comes later is refused its claim.
- STARTING or STARTED: CANCELING, and the agent holding the attempt gets a TerminateRun with
  the grace asked for (SIGTERM, then SIGKILL). The attempt's end, whatever it reports, ends the
  run CANCELED (a success that came first stays a success), never retried; the monitor ends
  it CANCELED with CANCEL_TIMEOUT when the agent does not confirm in time.
- CANCELING and final states: nothing changes (a cancel is idempotent); a final state is
  announced again (``RunEnded``), for whoever waits on this cancel.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

import asyncpg

from schemas import CancelRun, RunEnded, TerminateRun
from schemas.topology import CONTROL_EXCHANGE, INSTRUCTIONS_EXCHANGE

from ..states import TERMINAL, RunState
from . import answers, outbox, runs


class Outcome(enum.StrEnum):
    CANCELED = "CANCELED"  # it was QUEUED: canceled now
    CANCELING = "CANCELING"  # its agent was told to stop it
    ALREADY_CANCELING = "ALREADY_CANCELING"
    FINISHED = "FINISHED"  # it had ended before: nothing changed
    UNKNOWN = "UNKNOWN"  # no such run


@dataclass(frozen=True)
class Canceled:
    outcome: Outcome
    #: The run's state after the request (None for an unknown run).
    state: RunState | None


#: A cancel's messages have ids of their own per run, attempt and purpose: a request
#: redelivered writes the same messages again, which their consumers take once.
_id = answers.said_again_id


async def cancel(connection: asyncpg.Connection, request: CancelRun) -> Canceled:
    """Cancel ``request.run_id`` (see the module docstring), in the caller's transaction."""
    run = await connection.fetchrow(
        "SELECT run_id, attempt, state, queue, agent_id, held, exit_code, failure_reason,"
        " failure_message FROM runs WHERE run_id = $1 FOR UPDATE",
        request.run_id,
    )
    if run is None:
        return Canceled(Outcome.UNKNOWN, None)
    state = RunState(run["state"])
    if state in TERMINAL:
        # How it ended, said again for this request: one who waits on the cancel without
        # the database (``runs cancel --wait``) hears it, rather than wait for its timeout.
        await outbox.insert(
            connection, [outbox.answer(answers.ended_again(run, state, request.message_id))]
        )
        return Canceled(Outcome.FINISHED, state)
    if state == RunState.CANCELING:
        return Canceled(Outcome.ALREADY_CANCELING, state)
    why = request.reason or "canceled"
    attempt: int = run["attempt"]
    if state == RunState.QUEUED:
        await _record(connection, request, attempt, state, RunState.CANCELED, why)
        # A run a limit held never had a LaunchRun: no agent needs telling.
        fences = (
            []
            if run["held"]
            else await never_launch(
                connection, request.run_id, attempt, run["queue"], why, run["agent_id"]
            )
        )
        ended = RunEnded(
            message_id=_id(request.run_id, attempt, "ended"),
            run_id=request.run_id,
            attempt=attempt,
            state="CANCELED",
            message=why,
        )
        await outbox.insert(connection, [*fences, outbox.answer(ended)])
        return Canceled(Outcome.CANCELED, RunState.CANCELED)
    await _record(connection, request, attempt, state, RunState.CANCELING, why)
    if run["agent_id"] is not None:
        stop = _terminate(request.run_id, attempt, run["agent_id"], why, request.grace_s)
        await outbox.insert(connection, [stop])
    return Canceled(Outcome.CANCELING, RunState.CANCELING)


async def never_launch(
    connection: asyncpg.Connection,
    run_id: uuid.UUID,
    attempt: int,
    queue: str,
    why: str,
    holder: str | None = None,
) -> list[outbox.OutboxItem]:
    """For a queued attempt that has ended: drop its unsent LaunchRun rows, and the
    TerminateRun (to write with the caller's other rows) that fences it on every live agent of
    its queue, where its LaunchRun may wait already, and on the agent that claimed it
    (``holder``), whatever its state: a draining agent still starts what it was granted."""
    await connection.execute(
        "DELETE FROM outbox WHERE run_id = $1 AND sent_at IS NULL AND exchange = $2",
        run_id,
        INSTRUCTIONS_EXCHANGE,
    )
    live = await connection.fetch(
        """
        SELECT agent_id FROM agents WHERE status = 'ALIVE' AND queues ? $1
        UNION SELECT $2::text WHERE $2::text IS NOT NULL
        ORDER BY agent_id
        """,
        queue,
        holder,
    )
    return [_terminate(run_id, attempt, agent["agent_id"], why) for agent in live]


def _terminate(
    run_id: uuid.UUID, attempt: int, agent_id: str, why: str, grace_s: float = 30.0
) -> outbox.OutboxItem:
    """A TerminateRun of the attempt on ``agent_id``'s control queue, once per agent."""
    message = TerminateRun(
        message_id=_id(run_id, attempt, f"terminate:{agent_id}"),
        run_id=run_id,
        attempt=attempt,
        reason=why,
        grace_s=grace_s,
    )
    return outbox.OutboxItem(message, CONTROL_EXCHANGE, agent_id)


async def _record(
    connection: asyncpg.Connection,
    request: CancelRun,
    attempt: int,
    current: RunState,
    new: RunState,
    why: str,
) -> None:
    final = new in TERMINAL
    await connection.execute(
        """
        UPDATE runs SET state = $2, cancel_grace_s = $3, cancel_reason = $4,
            failure_message = CASE WHEN $5 THEN $4 ELSE failure_message END,
            finished_at = CASE WHEN $5 THEN now() ELSE finished_at END,
            state_changed_at = now(), updated_at = now()
        WHERE run_id = $1
        """,
        request.run_id,
        new.value,
        request.grace_s,
        why,
        final,
    )
    await connection.execute(
        """
        INSERT INTO run_events (event_id, run_id, attempt, kind, from_state, to_state, payload)
        VALUES ($1, $2, $3, 'CancelRun', $4, $5, $6::jsonb)
        ON CONFLICT (event_id) DO NOTHING
        """,
        runs.request_event_id("CancelRun", request.message_id),
        request.run_id,
        attempt,
        current.value,
        new.value,
        runs.payload_json(request),
    )
