"""What the HTTP API answers: msgspec structs, described in its OpenAPI document."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec

from ..store import RunEventRow, RunRow


class RunSummary(msgspec.Struct, frozen=True, kw_only=True):
    run_id: uuid.UUID
    state: str
    attempt: int
    queue: str
    image: str
    location: str | None
    job: str | None
    tags: dict[str, str]
    agent_id: str | None
    exit_code: int | None
    failure_reason: str | None
    priority: int
    #: The API token's name, or the broker user, that submitted it (when known).
    submitted_by: str | None
    #: The limit a held run waits for ("limit tag:team=ml"), while it does.
    waiting_on: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RunPage(msgspec.Struct, frozen=True, kw_only=True):
    runs: list[RunSummary]
    #: Pass as ``cursor`` for the next (older) page; None on the last page.
    next_cursor: str | None


class RunEventView(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    run_id: uuid.UUID
    kind: str
    attempt: int
    from_state: str | None
    to_state: str | None
    recorded_at: datetime
    payload: dict[str, Any]


class RunDetail(msgspec.Struct, frozen=True, kw_only=True):
    run: RunSummary
    command: list[str]
    container_id: str | None
    failure_message: str | None
    output_tail: list[str]
    #: Why a held run waits, with the limit's use ("limit q (2 of 2 running)").
    waiting: str | None
    events: list[RunEventView]
    progress: list[dict[str, Any]]


class OutputLine(msgspec.Struct, frozen=True):
    attempt: int
    line_no: int
    line: str


class OutputPage(msgspec.Struct, frozen=True, kw_only=True):
    lines: list[OutputLine]
    #: Pass as ``after`` for the lines that follow; None when this page is the last so far.
    next_after: str | None


class Submitted(msgspec.Struct, frozen=True, kw_only=True):
    run_id: uuid.UUID
    #: "accepted" (the run exists), "existing" (its idempotency key named an earlier run of
    #: this token's, whose id this is), or "sent" (not yet seen in the database).
    status: str


class CancelBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    grace_s: float = msgspec.field(default=30.0)
    reason: str = ""


class CancelAnswer(msgspec.Struct, frozen=True, kw_only=True):
    run_id: uuid.UUID
    state: str
    message: str


def summary(run: RunRow) -> RunSummary:
    return RunSummary(
        run_id=run.run_id,
        state=run.state.value,
        attempt=run.attempt,
        queue=run.queue,
        image=run.image,
        location=run.location,
        job=run.job,
        tags=run.tags,
        agent_id=run.agent_id,
        exit_code=run.exit_code,
        failure_reason=run.failure_reason,
        priority=run.priority,
        submitted_by=run.submitted_by,
        waiting_on=run.waiting_on,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
    )


#: What a run's environment values are shown as to a token that may not see them.
HIDDEN = "(hidden)"


def sees_env(scope: str) -> bool:
    """Whether a token of ``scope`` sees the values of a run's environment (as it sees dead
    letters' bodies): ``operate`` and ``admin`` do, ``read`` sees their names only."""
    return scope in ("operate", "admin")


def event_view(run_id: uuid.UUID, event: RunEventRow, env: bool = False) -> RunEventView:
    """An event as the API shows it; a submission's environment values only with ``env``."""
    payload = event.payload
    if not env and isinstance(payload.get("env"), dict):
        payload = {**payload, "env": dict.fromkeys(payload["env"], HIDDEN)}
    return RunEventView(
        seq=event.seq,
        run_id=run_id,
        kind=event.kind,
        attempt=event.attempt,
        from_state=event.from_state,
        to_state=event.to_state,
        recorded_at=event.recorded_at,
        payload=payload,
    )
