"""Where a run is, said again (``RunStateWanted``, and a cancel of a run that has ended).

One who follows a run through the broker alone (``runs cancel --wait``, a script's waits)
hears its end only as it is published: a connection lost and regained meanwhile loses what
was sent in between. Asked, the control plane says it again through the outbox: ``RunEnded``
for a run in a final state, ``RunAccepted`` for one under way (its end is still to come),
``RunRejected`` for a submission that was refused (no run, but the refusal is kept).
"""

from __future__ import annotations

import enum
import json
import uuid

import asyncpg
import msgspec

from schemas import FailureReason, RunAccepted, RunEnded, RunRejected, RunStateWanted
from schemas.bounds import MAX_TEXT

from ..states import TERMINAL, RunState
from . import outbox

#: A RunEnded's output tail: at most this many lines of at most this many characters.
MAX_LINES, MAX_LINE = 1000, 16 * 1024

_SAID_AGAIN = uuid.UUID("4b1d1c8e-2f55-4d0a-9e8b-6f0c2f1d3a77")


class Said(enum.StrEnum):
    ENDED = "ENDED"  # its RunEnded, again
    UNDER_WAY = "UNDER_WAY"  # its RunAccepted, again
    REFUSED = "REFUSED"  # its submission was refused: its RunRejected, again
    UNKNOWN = "UNKNOWN"  # no such run, no refusal kept: nothing said


def said_again_id(run_id: uuid.UUID, attempt: int, what: str) -> uuid.UUID:
    """The message id of an announcement made again for one request (``what`` names it)."""
    return uuid.uuid5(_SAID_AGAIN, f"{run_id}/{attempt}/{what}")


async def say_again(
    connection: asyncpg.Connection, request: RunStateWanted, refusals: bool = True
) -> Said:
    """Announce again where ``request.run_id`` is (see the module docstring), in the
    caller's transaction. The row is read without a lock (a batch of asks locking rows in
    its own order could deadlock with the events' transactions): an end recorded meanwhile
    may go out before the "under way" read before it, which followers take for what it
    is (an end stays a run's last word)."""
    run = await connection.fetchrow(
        "SELECT run_id, attempt, state, exit_code, failure_reason, failure_message, output_tail"
        " FROM runs WHERE run_id = $1",
        request.run_id,
    )
    if run is None:
        # A refused submission left no run, but its refusal is kept in the outbox (until
        # retention prunes it).
        refusal = await kept_refusal(connection, request.run_id)
        if refusal is None or not refusals:
            return Said.UNKNOWN  # (``refusals`` off: said as if none were kept)
        again = RunRejected(
            message_id=said_again_id(request.run_id, 0, f"rejected:{request.message_id}"),
            run_id=request.run_id,
            reason=refusal,
        )
        await outbox.insert(connection, [outbox.answer(again)])
        return Said.REFUSED
    state = RunState(run["state"])
    if state in TERMINAL:
        await outbox.insert(
            connection, [outbox.answer(ended_again(run, state, request.message_id))]
        )
        return Said.ENDED
    accepted = RunAccepted(
        message_id=said_again_id(request.run_id, run["attempt"], f"accepted:{request.message_id}"),
        run_id=request.run_id,
    )
    await outbox.insert(connection, [outbox.answer(accepted)])
    return Said.UNDER_WAY


def ended_again(run: asyncpg.Record, state: RunState, request_id: uuid.UUID) -> RunEnded:
    """How ``run`` ended (a final ``state``), said again for the request ``request_id``."""
    reason = run["failure_reason"]
    return RunEnded(
        message_id=said_again_id(run["run_id"], run["attempt"], f"ended-again:{request_id}"),
        run_id=run["run_id"],
        attempt=run["attempt"],
        state=state.value,  # type: ignore[arg-type]
        exit_code=run["exit_code"] if -1 <= (run["exit_code"] or 0) <= 255 else None,
        reason=_reason(reason),
        message=(run["failure_message"] or "")[:MAX_TEXT],
        output_tail=_tail(run.get("output_tail")),
    )


def _tail(stored: str | None) -> tuple[str, ...]:
    """The output tail kept with the run (JSON), as the contract bounds a RunEnded's."""
    try:
        lines = json.loads(stored) if stored else []
    except ValueError:
        return ()
    if not isinstance(lines, list):
        return ()
    kept = tuple(line[:MAX_LINE] for line in lines if isinstance(line, str))
    return kept[-MAX_LINES:]


class _Refusal(msgspec.Struct):
    reason: str = "refused"


async def kept_refusal(connection: asyncpg.Connection, run_id: uuid.UUID) -> str | None:
    """Why the submission of ``run_id`` was refused, from its ``RunRejected`` kept in the
    outbox; None when none is kept (never refused, or pruned by retention)."""
    payload = await connection.fetchval(
        "SELECT payload FROM outbox WHERE run_id = $1 AND kind = 'RunRejected' ORDER BY id LIMIT 1",
        run_id,
    )
    if payload is None:
        return None
    try:
        reason = msgspec.json.decode(payload, type=_Refusal).reason
    except msgspec.DecodeError:
        reason = "refused"
    return reason[:MAX_TEXT]


def _reason(stored: str | None) -> FailureReason | None:
    try:
        return FailureReason(stored) if stored else None
    except ValueError:
        return None
