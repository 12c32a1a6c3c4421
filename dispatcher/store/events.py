"""Run events: each one recorded once, moving its run by the state machine.

An event applies only to its run's current attempt, and only from the agent that holds it
once one does. A failure the run's policy retries sends the run back to QUEUED with a delayed
LaunchRun; a failure of a CANCELING run cancels it; a terminal state is announced to the run's
followers (RunEnded), and a failure raises an alert, all in the caller's transaction.
"""

from __future__ import annotations

import json
import logging
import uuid

import asyncpg

from schemas import (
    LaunchGranted,
    RunClaimed,
    RunEnded,
    RunEvent,
    RunFailed,
    RunLaunched,
    RunRetrying,
    TerminateRun,
)
from schemas.topology import CONTROL_EXCHANGE, INSTRUCTIONS_EXCHANGE

from ..retries import backoff_s
from ..states import TERMINAL, RunState, next_state
from . import alerts, outbox, runs

log = logging.getLogger(__name__)

#: The namespace of agents' events' stored ids (see ``stored_id``).
_AGENT_EVENTS = uuid.UUID("5d7c54c2-7a5e-4c51-9d0e-2f6c3b1a9e47")


def stored_id(event: RunEvent) -> uuid.UUID:
    """The id an event is recorded under: an agent's event under one derived from its agent
    and its message id, so that the id an agent chooses can never be one that the control
    plane or the monitor gives a decision (a decision whose id is taken would be skipped as
    a redelivery). A redelivered event still gets the same id."""
    agent_id = getattr(event, "agent_id", None)
    if agent_id is None:
        return event.message_id
    return uuid.uuid5(_AGENT_EVENTS, f"{agent_id}/{event.message_id}")


async def apply(
    connection: asyncpg.Connection,
    event: RunEvent,
    retry_backoff_s: float,
    answers: list[outbox.OutboxItem] | None = None,
) -> bool:
    """Apply one run event; True when it changed its run's state.

    ``answers``: where a claim's answer goes, for the caller to publish once the transaction
    commits (see ``claim``); None: to the outbox."""
    run = await connection.fetchrow("SELECT * FROM runs WHERE run_id = $1 FOR UPDATE", event.run_id)
    if isinstance(event, RunClaimed):
        await claim(connection, run, event, answers)
        return False
    if run is None:
        log.warning("event %s for unknown run %s ignored", type(event).__name__, event.run_id)
        return False
    current = RunState(run["state"])
    owner, sender = run["agent_id"], getattr(event, "agent_id", None)
    foreign = owner is not None and sender is not None and sender != owner
    current_attempt = event.attempt == run["attempt"] and not foreign
    new = next_state(current, event) if current_attempt else None
    retry = (
        new == RunState.FAILURE
        and isinstance(event, RunFailed)
        and runs.retry_policy(run).retries(event.reason, event.attempt)
    )
    if retry:
        new = RunState.QUEUED
    inserted = await _insert(connection, event, current if new else None, new)
    if inserted and isinstance(event, RunLaunched) and stray_launch(run, current, event):
        # The attempt ended, or was superseded, before this agent launched it (canceled,
        # timed out or failed over while its LaunchRun waited in a queue, or while its
        # claimant created the container): stop it at once.
        await outbox.insert(connection, [_stop_stray(event)])
    if not inserted or new is None:
        return False  # a redelivered event, a stale attempt, or no transition
    if retry:
        assert isinstance(event, RunFailed)
        await _schedule_retry(connection, run, event, retry_backoff_s)
        return True
    await _update_run(connection, event, new)
    if new in TERMINAL:
        await _announce_end(connection, event, new)
    if isinstance(event, RunFailed) and new == RunState.FAILURE:
        await alerts.raise_alert(
            connection,
            f"run-failed:{event.run_id}",
            alerts.RUN_FAILED,
            f"run {event.run_id}",
            f"run {event.run_id} failed on attempt {event.attempt}: {event.reason.value}"
            + (f" (exit code {event.exit_code})" if event.exit_code is not None else ""),
            {
                "run_id": str(event.run_id),
                "attempt": event.attempt,
                "reason": event.reason.value,
                "exit_code": event.exit_code,
                "message": event.message,
            },
        )
    return True


async def claim(
    connection: asyncpg.Connection,
    run: asyncpg.Record | None,
    event: RunClaimed,
    answers: list[outbox.OutboxItem] | None = None,
) -> bool:
    """Record the first claim of an attempt and answer the claimant; True when it holds it.

    The claimant's agent is the run's holder from now on (the run stays QUEUED until its
    RunLaunched): it is answered with ``LaunchGranted``, and so is a claim repeated by the
    holder. Any other claim (another agent's, of an earlier attempt, of a run that ended) is
    answered with a ``TerminateRun``: that agent never starts its container. The answer's id
    derives from the claim's, so a redelivered claim is answered once.

    The answer goes to ``answers`` when given: the status consumer publishes it right after
    the commit, sparing the launch the relay's round trip. Nothing is lost if that publish
    is: a claimant with no answer claims again (``worker_agent.claims``), and is answered the
    same, since the claim was recorded.
    """
    why = _claim_refused(run, event)
    if why is None and run is not None and run["agent_id"] is None:
        await connection.execute(
            "UPDATE runs SET agent_id = $2, updated_at = now() WHERE run_id = $1",
            event.run_id,
            event.agent_id,
        )
    if run is not None:
        await _insert(connection, event, None, None)  # in the run's history, granted or not
    item = _answer(event, why)
    if answers is not None:
        answers.append(item)
    else:
        await outbox.insert(connection, [item])
    return why is None


async def grant_at_once(
    connection: asyncpg.Connection, event: RunClaimed
) -> outbox.OutboxItem | None:
    """The usual claim, granted in two round trips and no transaction of its own; its
    ``LaunchGranted``, for the caller to publish. None when it is not a grant, or its run
    changed between the two: ``claim`` decides then, in a transaction.

    The run is read, the claim judged (``_claim_refused``, as ``claim`` does), then one
    statement makes the claimant the holder and records the claim, only if the run is still
    as it was read (a compare-and-set): a claim that races a cancel, a retry or another
    agent's claim changes nothing here.
    """
    run = await connection.fetchrow("SELECT * FROM runs WHERE run_id = $1", event.run_id)
    if run is None or _claim_refused(run, event) is not None:
        return None
    held = await connection.fetchval(
        """
        WITH holder AS (
            UPDATE runs SET agent_id = $2,
                            updated_at = CASE WHEN agent_id IS NULL THEN now()
                                              ELSE updated_at END
            WHERE run_id = $1 AND attempt = $3 AND state = $6 AND NOT held
              AND agent_id IS NOT DISTINCT FROM $7
            RETURNING run_id
        ), recorded AS (
            INSERT INTO run_events (event_id, run_id, attempt, kind, payload)
            SELECT $4::uuid, run_id, $3::int, 'RunClaimed', $5::jsonb FROM holder
            WHERE NOT EXISTS (SELECT 1 FROM run_events WHERE event_id = $4)
            ON CONFLICT (event_id) DO NOTHING
        )
        SELECT count(*) FROM holder
        """,
        event.run_id,
        event.agent_id,
        event.attempt,
        stored_id(event),
        runs.payload_json(event),
        run["state"],
        run["agent_id"],
    )
    return _answer(event, None) if held else None


def _answer(event: RunClaimed, why: str | None) -> outbox.OutboxItem:
    """A claim's answer to its claimant: granted when ``why`` is None, refused with it."""
    answer: LaunchGranted | TerminateRun
    if why is None:
        answer = LaunchGranted(
            message_id=uuid.uuid5(event.message_id, "granted"),
            run_id=event.run_id,
            attempt=event.attempt,
            agent_id=event.agent_id,
        )
    else:
        log.warning(
            "run %s attempt %d: claim of agent %s refused: %s",
            event.run_id,
            event.attempt,
            event.agent_id,
            why,
        )
        answer = TerminateRun(
            message_id=uuid.uuid5(event.message_id, "refused"),
            run_id=event.run_id,
            attempt=event.attempt,
            reason=f"claim refused: {why}",
            grace_s=10.0,
        )
    return outbox.OutboxItem(answer, CONTROL_EXCHANGE, event.agent_id)


def _claim_refused(run: asyncpg.Record | None, event: RunClaimed) -> str | None:
    """Why a claim is refused, in words; None when the claimant holds the attempt."""
    if run is None:
        return "no such run"
    if event.attempt != run["attempt"]:
        return f"attempt {event.attempt} was superseded by attempt {run['attempt']}"
    state = RunState(run["state"])
    if state in TERMINAL:
        return f"the run ended {state.value}"
    if run["held"]:
        return "the run waits for a concurrency limit"
    holder = run["agent_id"]
    if holder is not None and holder != event.agent_id:
        return f"attempt {event.attempt} is held by agent {holder}"
    return None


def stray_launch(run: asyncpg.Record, current: RunState, event: RunLaunched) -> bool:
    """A launch of an attempt that can no longer run: an earlier attempt than the run's
    last, or the last one of a run that has ended (by any agent, its holder included: a
    claimant is told of a cancel only while it is alive, and a retry tells it nothing)."""
    return bool(
        event.attempt < run["attempt"] or (event.attempt == run["attempt"] and current in TERMINAL)
    )


def _stop_stray(event: RunLaunched) -> outbox.OutboxItem:
    stop = TerminateRun(
        message_id=uuid.uuid5(event.message_id, "stray"),
        run_id=event.run_id,
        attempt=event.attempt,
        reason="the run ended before this launch",
        grace_s=10.0,
    )
    return outbox.OutboxItem(stop, CONTROL_EXCHANGE, event.agent_id)


async def _insert(
    connection: asyncpg.Connection,
    event: RunEvent,
    from_state: RunState | None,
    to_state: RunState | None,
) -> bool:
    """Append an event; False when its id was recorded before (a redelivery)."""
    seq = await connection.fetchval(
        """
        INSERT INTO run_events (event_id, run_id, attempt, kind, from_state, to_state, payload)
        SELECT $1::uuid, $2::uuid, $3::int, $4::text, $5::text, $6::text, $7::jsonb
        -- A redelivery takes no sequence number (ON CONFLICT alone would burn one, a gap the
        -- event streams would wait at); the conflict clause covers a race of two deliveries.
        WHERE NOT EXISTS (SELECT 1 FROM run_events WHERE event_id = $1)
        ON CONFLICT (event_id) DO NOTHING
        RETURNING seq
        """,
        stored_id(event),
        event.run_id,
        event.attempt,
        type(event).__name__,
        from_state.value if from_state else None,
        to_state.value if to_state else None,
        runs.payload_json(event),
    )
    return seq is not None


async def _schedule_retry(
    connection: asyncpg.Connection,
    run: asyncpg.Record,
    failed: RunFailed,
    retry_backoff_s: float,
) -> None:
    """The next attempt: the run goes back to QUEUED and a delayed LaunchRun is written."""
    attempt = failed.attempt + 1
    delay = backoff_s(failed.attempt, retry_backoff_s)
    await connection.execute(
        """
        UPDATE runs SET state = 'QUEUED', attempt = $2, agent_id = NULL, container_id = NULL,
            exit_code = NULL, failure_reason = $3, failure_message = $4,
            started_at = NULL, state_changed_at = now(), updated_at = now()
        WHERE run_id = $1
        """,
        failed.run_id,
        attempt,
        failed.reason.value,
        f"attempt {failed.attempt} failed ({failed.reason.value}); retrying",
    )
    retrying = RunRetrying(
        run_id=failed.run_id,
        attempt=failed.attempt,
        next_attempt=attempt,
        reason=failed.reason,
        delay_s=delay,
        message=failed.message,
    )
    launch = outbox.OutboxItem(
        runs.launch(runs.decoded(run), attempt), INSTRUCTIONS_EXCHANGE, run["queue"], delay
    )
    # A run a limit still holds (it timed out waiting) gets its next attempt from the
    # admitter, like its first.
    await outbox.insert(
        connection,
        [launch, outbox.answer(retrying)] if not run["held"] else [outbox.answer(retrying)],
    )
    log.info(
        "run %s attempt %d failed (%s); attempt %d in %.1f s",
        failed.run_id,
        failed.attempt,
        failed.reason.value,
        attempt,
        delay,
    )


async def _update_run(connection: asyncpg.Connection, event: RunEvent, new: RunState) -> None:
    failed = event if isinstance(event, RunFailed) else None
    await connection.execute(
        """
        UPDATE runs SET
            state = $2,
            agent_id = COALESCE($3, agent_id),
            container_id = COALESCE($4, container_id),
            exit_code = CASE WHEN $5 THEN $6 ELSE exit_code END,
            failure_reason = CASE WHEN $5 THEN $7 ELSE failure_reason END,
            failure_message = CASE WHEN $5 THEN $8 ELSE failure_message END,
            output_tail = CASE WHEN $5 THEN $9::jsonb ELSE output_tail END,
            started_at = CASE WHEN $2 = 'STARTED' THEN COALESCE(started_at, now())
                              ELSE started_at END,
            finished_at = CASE WHEN $5 THEN now() ELSE finished_at END,
            state_changed_at = now(),
            updated_at = now()
        WHERE run_id = $1
        """,
        event.run_id,
        new.value,
        getattr(event, "agent_id", None),
        getattr(event, "container_id", None),
        new in TERMINAL,
        getattr(event, "exit_code", None),
        failed.reason.value if failed else None,
        failed.message if failed else None,
        json.dumps(list(getattr(event, "output_tail", ()))),
    )


async def _announce_end(connection: asyncpg.Connection, event: RunEvent, state: RunState) -> None:
    """RunEnded: the verdict waiters wait for (a failure may still be retried before it)."""
    failed = event if isinstance(event, RunFailed) else None
    ended = RunEnded(
        message_id=uuid.uuid5(event.message_id, "ended"),
        run_id=event.run_id,
        attempt=event.attempt,
        state=state.value,  # type: ignore[arg-type]
        exit_code=getattr(event, "exit_code", None),
        reason=failed.reason if failed else None,
        message=failed.message if failed else "",
        output_tail=tuple(getattr(event, "output_tail", ())),
    )
    await outbox.insert(connection, [outbox.answer(ended)])
