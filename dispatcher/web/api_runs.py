"""``/api/v1/runs``: list, read, submit and cancel runs.

Reads go to PostgreSQL; a submission or a cancel is published through the broker, as the CLI
does, and answered once the control plane has taken it (or refused it, with the reason).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.exceptions import (
    ClientException,
    NotFoundException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.params import Parameter

from schemas import (
    CancelRun,
    InvalidMessage,
    SchemaError,
    SubmitRun,
    encode,
    is_safe_name,
    request_decoder,
)
from schemas.bounds import INT32_MAX

from ..client import check_submission
from ..errors import InvalidSubmission, LocationNotFound, RunNotFound
from ..states import TERMINAL, RunState
from ..store import Database, RunFilters
from ..store.api_tokens import ApiToken
from ..submitters import limits_problem, reach_problem
from . import views
from .auth import token_of
from .broker import Broker

#: How long a submission waits for the control plane's word before answering "sent".
ANSWER_WITHIN_S = 10.0


def _cursor(run: views.RunSummary) -> str:
    raw = f"{run.created_at.isoformat()}|{run.run_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, run_id = raw.partition("|")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError(at)
        return when.astimezone(UTC), uuid.UUID(run_id)
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise ValidationException(
            "cursor: not a cursor this API gave (pass next_cursor as it is)"
        ) from None


def _tags(tag: list[str] | None) -> dict[str, str] | None:
    if not tag:
        return None
    tags = {}
    for pair in tag:
        key, sep, value = pair.partition("=")
        if not sep or not key or "\x00" in pair or len(pair) > 1000:
            raise ValidationException(
                f"tag: KEY=VALUE (no NUL, 1000 characters at most), not {pair[:60]!r}"
            )
        tags[key] = value
    return tags


def _name(field: str, value: str | None) -> str | None:
    """A queue or location name to filter on: it has a name's form, or nothing has it."""
    if value is not None and not is_safe_name(value):
        raise ValidationException(
            f"{field}: 1 to 64 letters, digits, '_' and '-', not {value[:60]!r}"
        )
    return value


def _instant(field: str, value: datetime | None) -> datetime | None:
    """A time to filter on, in UTC; one without a zone is taken as UTC."""
    if value is None:
        return None
    try:
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValidationException(f"{field}: a time between the years 1 and 9999") from None


async def _within_limits(store: Database, token: ApiToken, submission: SubmitRun) -> None:
    """Refuse (403, with the reason) a submission outside the token's queues or locations."""
    limits = token.limits
    if not limits.bounded:
        return
    queue: str | None = submission.queue
    if submission.location is not None:
        try:
            # A job runs on its location's queue: that is the queue the limits apply to.
            queue = (await store.locations.get(submission.location)).queue
        except LocationNotFound:
            queue = None  # the intake refuses it, naming the location
    why = limits_problem(token.name, limits, submission, queue)
    if why is not None:
        raise PermissionDeniedException(why)


async def _run(store: Database, run_id: uuid.UUID) -> views.RunSummary:
    try:
        return views.summary(await store.runs.get(run_id))
    except RunNotFound:
        raise NotFoundException(f"no run {run_id}") from None


def _in_reach(token: ApiToken, run_id: uuid.UUID, queue: str, location: str | None) -> None:
    """A token limited to queues or locations reads only the runs it could have submitted;
    any other is answered as if there were none (its id says nothing)."""
    if reach_problem(token.name, token.limits, queue, location) is not None:
        raise NotFoundException(f"no run {run_id}")


def _repeated(
    data: SubmitRun, token: str, found: uuid.UUID, submitted_by: str | None
) -> views.Submitted:
    """The answer to a submission whose run id or key is an earlier run's: that run, when this
    token submitted it; otherwise 409, without naming it."""
    if submitted_by != token:
        what = "run_id" if found == data.run_id else "idempotency key"
        raise ClientException(
            f"submission rejected: its {what} is an earlier submission's", status_code=409
        )
    status = "accepted" if found == data.run_id else "existing"
    return views.Submitted(run_id=found, status=status)


class RunsController(Controller):
    path = "/runs"
    tags = ["runs"]

    @get("/")
    async def list_runs(
        self,
        request: Request[Any, Any, Any],
        store: Database,
        run_state: Annotated[str | None, Parameter(query="state")] = None,
        queue: str | None = None,
        location: str | None = None,
        tag: Annotated[
            list[str] | None, Parameter(description="KEY=VALUE; repeat to require several")
        ] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
        cursor: str | None = None,
    ) -> views.RunPage:
        """Runs, newest first, filtered; page with ``cursor``."""
        if run_state is not None and run_state.upper() not in RunState.__members__:
            raise ValidationException(
                f"state: one of {', '.join(RunState.__members__)}, not {run_state!r}"
            )
        filters = RunFilters(
            state=run_state.upper() if run_state else None,
            queue=_name("queue", queue),
            location=_name("location", location),
            tags=_tags(tag),
            since=_instant("since", since),
            until=_instant("until", until),
            within=token_of(request).limits,
        )
        before = _after_cursor(cursor) if cursor else None
        rows = await store.runs.page(filters, limit + 1, before)
        runs = [views.summary(r) for r in rows[:limit]]
        more = len(rows) > limit
        return views.RunPage(runs=runs, next_cursor=_cursor(runs[-1]) if more else None)

    @get("/{run_id:uuid}")
    async def get_run(
        self, request: Request[Any, Any, Any], store: Database, run_id: uuid.UUID
    ) -> views.RunDetail:
        """A run: its history, output tail, progress and what it waits for."""
        try:
            run = await store.runs.get(run_id)
        except RunNotFound:
            raise NotFoundException(f"no run {run_id}") from None
        token = token_of(request)
        _in_reach(token, run_id, run.queue, run.location)
        events = await store.runs.events(run_id)
        waiting = await store.limits.waiting_reason(run_id) if run.waiting_on else None
        return views.RunDetail(
            run=views.summary(run),
            command=run.command,
            container_id=run.container_id,
            failure_message=run.failure_message,
            output_tail=run.output_tail,
            waiting=waiting or run.waiting_on,
            events=[views.event_view(run_id, e, views.sees_env(token.scope)) for e in events],
            progress=await store.output.progress(run_id),
        )

    @get("/{run_id:uuid}/output")
    async def get_output(
        self,
        request: Request[Any, Any, Any],
        store: Database,
        run_id: uuid.UUID,
        attempt: Annotated[int | None, Parameter(ge=1, le=1000)] = None,
        after: Annotated[
            str | None, Parameter(description="ATTEMPT:LINE of the last line seen")
        ] = None,
        limit: Annotated[int, Parameter(ge=1, le=10_000)] = 1000,
    ) -> views.OutputPage:
        """A run's forwarded output lines, in order, a page at a time."""
        start = (0, -1)
        if after:
            a, _, n = after.partition(":")
            try:
                start = (int(a), int(n))
            except ValueError:
                start = (-1, -1)
            if not (0 <= start[0] <= 1000 and 0 <= start[1] <= INT32_MAX):
                raise ValidationException(
                    f"after: ATTEMPT:LINE as next_after gave it, not {after[:40]!r}"
                ) from None
        run = await _run(store, run_id)
        _in_reach(token_of(request), run_id, run.queue, run.location)
        lines = await store.output.page(run_id, attempt, start, limit + 1)
        page = [views.OutputLine(*line) for line in lines[:limit]]
        last = page[-1] if page else None
        return views.OutputPage(
            lines=page,
            next_after=f"{last.attempt}:{last.line_no}" if last and len(lines) > limit else None,
        )

    @post("/", status_code=202, opt={"scope": "operate"})
    async def submit(
        self, request: Request[Any, Any, Any], store: Database, broker: Broker, data: SubmitRun
    ) -> views.Submitted:
        """Submit a run or a job (the contract's SubmitRun; choose its run_id). Answered once
        the run exists (202), or with the control plane's refusal and its reason (422)."""
        try:
            check_submission(data)
        except InvalidSubmission as exc:
            raise ValidationException(str(exc), extra={"field": exc.field}) from None
        token = token_of(request)
        await _within_limits(store, token, data)
        # A run with this id or key exists: this token's is answered (a repeated submission);
        # another's is not named (ids and keys may be guessed), and nothing is sent.
        if (prior := await store.runs.prior(data.run_id, data.idempotency_key)) is not None:
            return _repeated(data, token.name, *prior)
        # Stamped here: the envelope's id and time are the sender's, not the caller's.
        await broker.submit(
            msgspec.structs.replace(
                data, submitted_by=token.name, message_id=uuid.uuid4(), sent_at=datetime.now(UTC)
            )
        )
        # The intake's word is in PostgreSQL: the run, or the RunRejected it answered with.
        for _ in range(int(ANSWER_WITHIN_S / 0.05)):
            made, reason = await store.runs.answer(data.run_id)
            if reason is not None:
                # Its key may have been taken meanwhile by a submission of this token's own
                # (a retry with a new run_id before the first was made): that run answers.
                prior = await store.runs.prior(data.run_id, data.idempotency_key)
                if data.idempotency_key and prior is not None:
                    return _repeated(data, token.name, *prior)
                raise ClientException(f"submission rejected: {reason}", status_code=422)
            if made is not None:
                return views.Submitted(run_id=made, status="accepted")
            await asyncio.sleep(0.05)
        return views.Submitted(run_id=data.run_id, status="sent")

    @post("/{run_id:uuid}/cancel", status_code=202, opt={"scope": "operate"})
    async def cancel(
        self,
        request: Request[Any, Any, Any],
        store: Database,
        broker: Broker,
        run_id: uuid.UUID,
        data: views.CancelBody | None = None,
    ) -> views.CancelAnswer:
        """Cancel a run (idempotent); a finished run is answered 409 with its state, a run
        outside the token's queues or locations 404, as one that does not exist."""
        body = data or views.CancelBody()
        if not 0 <= body.grace_s <= 3600:
            raise ValidationException("grace_s: 0 to 3600 seconds")
        try:
            # What the intake would dead-letter is refused here, in words, not answered 202.
            cancel = CancelRun(run_id=run_id, grace_s=body.grace_s, reason=body.reason)
            request_decoder().decode(encode(cancel))
        except InvalidMessage as exc:
            where = f"{exc.field.removeprefix('$.')}: " if exc.field else ""
            raise ValidationException(f"{where}{exc.detail}") from None
        except SchemaError as exc:
            raise ValidationException(str(exc)) from None
        run = await _run(store, run_id)
        _in_reach(token_of(request), run_id, run.queue, run.location)
        if RunState(run.state) in TERMINAL and run.state != RunState.CANCELED:
            raise ClientException(f"run {run_id} has ended already: {run.state}", status_code=409)
        await broker.cancel(run_id, body.grace_s, body.reason)
        for _ in range(int(ANSWER_WITHIN_S / 0.1)):
            run = await _run(store, run_id)
            if run.state in (RunState.CANCELING, RunState.CANCELED) or run.state in TERMINAL:
                break
            await asyncio.sleep(0.1)
        return views.CancelAnswer(run_id=run_id, state=run.state, message="cancel requested")
