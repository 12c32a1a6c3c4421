"""The store: PostgreSQL through asyncpg, the one source of truth of the control plane.

Runs, their events and the outbox live here; code locations, supervision, alerts and dead
letters have modules of their own that run SQL on this store's connections. asyncpg's
connection errors become ``StoreUnavailable`` here, for all of them.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

import asyncpg
import msgspec

from schemas import (
    AgentHeartbeat,
    Event,
    FailureReason,
    LaunchRun,
    LocationFailed,
    LocationLoaded,
    Message,
    RunAccepted,
    RunEnded,
    RunEvent,
    RunFailed,
    RunLog,
    RunProgress,
    RunRejected,
    RunRetrying,
    SubmitRun,
    encode,
    kind_of,
)
from schemas.topology import (
    CONTROL_SOURCE,
    INSTRUCTIONS_EXCHANGE,
    STATUS_EXCHANGE,
    event_routing_key,
)

from . import alerts, dead_letters, migrations
from .errors import RunNotFound, StoreUnavailable
from .retries import DEFAULT_MAX_RETRIES, DEFAULT_RETRY_ON, RetryPolicy, backoff_s
from .states import TERMINAL, RunState, next_state

log = logging.getLogger(__name__)

#: NOTIFY channel that wakes the outbox relay.
OUTBOX_CHANNEL = "hd_outbox"

#: asyncpg's exceptions that mean "the database is out for now" (every adapter of ours
#: that talks to PostgreSQL translates these, and only these, into StoreUnavailable).
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    # Shutdown, crash and recovery of the server (SQL state class 57).
    asyncpg.exceptions.OperatorInterventionError,
    # A pooled connection the server dropped mid-operation can be left in a state where its
    # next use fails this way (seen when PostgreSQL restarts under load).
    asyncpg.exceptions.InternalClientError,
)


@dataclass(frozen=True)
class OutboxRow:
    id: int
    exchange: str
    routing_key: str
    kind: str
    message_id: uuid.UUID
    payload: bytes
    run_id: uuid.UUID | None = None
    attempt: int = 0


@dataclass(frozen=True)
class RunEventRow:
    seq: int
    kind: str
    attempt: int
    from_state: str | None
    to_state: str | None
    recorded_at: datetime
    payload: dict[str, Any]


@dataclass(frozen=True)
class RunRow:
    run_id: uuid.UUID
    idempotency_key: str
    queue: str
    image: str
    command: list[str]
    state: RunState
    attempt: int
    agent_id: str | None
    container_id: str | None
    exit_code: int | None
    failure_reason: str | None
    failure_message: str | None
    output_tail: list[str]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    tags: dict[str, str]

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> RunRow:
        return cls(
            run_id=record["run_id"],
            idempotency_key=record["idempotency_key"],
            queue=record["queue"],
            image=record["image"],
            command=json.loads(record["command"]),
            state=RunState(record["state"]),
            attempt=record["attempt"],
            agent_id=record["agent_id"],
            container_id=record["container_id"],
            exit_code=record["exit_code"],
            failure_reason=record["failure_reason"],
            failure_message=record["failure_message"],
            output_tail=json.loads(record["output_tail"]),
            created_at=record["created_at"],
            updated_at=record["updated_at"],
            started_at=record["started_at"],
            finished_at=record["finished_at"],
            tags=json.loads(record["tags"]),
        )


def _launch_for(submit: SubmitRun, attempt: int) -> LaunchRun:
    return LaunchRun(
        run_id=submit.run_id,
        attempt=attempt,
        image=submit.image,
        command=submit.command,
        env=submit.env,
        tags=submit.tags,
        max_runtime_s=submit.max_runtime_s,
        memory_limit_mb=submit.memory_limit_mb,
        ready_check=submit.ready_check,
        location=submit.location,
        job=submit.job,
        config=submit.config,
    )


class Store:
    """Runs, their events, the outbox and agents, in PostgreSQL."""

    def __init__(
        self, pool: asyncpg.Pool, dsn: str, schema: str | None, retry_backoff_s: float = 1.0
    ) -> None:
        self._pool = pool
        self._dsn = dsn
        self._schema = schema
        self.retry_backoff_s = retry_backoff_s

    @classmethod
    async def open(
        cls,
        dsn: str,
        schema: str | None = None,
        min_size: int = 2,
        max_size: int = 10,
        retry_backoff_s: float = 1.0,
    ) -> Self:
        """Connect (a pool); ``schema`` puts every table in that schema (tests isolate so)."""
        settings = {"search_path": schema} if schema else {}
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, server_settings=settings, timeout=30
            )
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc!r}") from exc
        assert pool is not None
        return cls(pool, dsn, schema, retry_backoff_s)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool.acquire() as connection:
                yield connection
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc

    def connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A pooled connection whose connection errors surface as ``StoreUnavailable``."""
        return self._connection()

    async def upgrade(self) -> list[int]:
        """Apply pending migrations."""
        async with self._connection() as connection:
            if self._schema:
                await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
            return await migrations.upgrade(connection)

    # ------------------------------------------------------------------ submissions

    async def create_runs(self, submissions: Sequence[SubmitRun]) -> list[uuid.UUID]:
        """Create runs with their LaunchRun outbox rows in one transaction.

        A submission whose run id or idempotency key exists already creates nothing; the ids
        of the runs created now are returned.
        """
        if not submissions:
            return []
        async with self._connection() as connection, connection.transaction():
            return await self._create_runs(connection, submissions)

    async def _create_runs(
        self,
        connection: asyncpg.Connection,
        submissions: Sequence[SubmitRun],
        announce: bool = False,
    ) -> list[uuid.UUID]:
        """Insert runs, their first events and LaunchRun rows (and RunAccepted if ``announce``)."""
        created = await connection.fetch(
            """
            INSERT INTO runs (run_id, idempotency_key, queue, image, command, env, tags,
                              max_runtime_s, start_timeout_s, max_retries, retry_on,
                              memory_limit_mb, ready_check, location, job, config, state)
            SELECT r.run_id, r.key, r.queue, r.image, r.command::jsonb, r.env::jsonb,
                   r.tags::jsonb, r.max_runtime_s, r.start_timeout_s, r.max_retries,
                   r.retry_on::jsonb, r.memory_limit_mb, r.ready_check::jsonb,
                   r.location, r.job, r.config::jsonb, 'QUEUED'
            FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                        $6::text[], $7::text[], $8::float8[], $9::float8[], $10::int[],
                        $11::text[], $12::int[], $13::text[], $14::text[], $15::text[],
                        $16::text[])
                 AS r(run_id, key, queue, image, command, env, tags, max_runtime_s,
                      start_timeout_s, max_retries, retry_on, memory_limit_mb, ready_check,
                      location, job, config)
            ON CONFLICT DO NOTHING
            RETURNING run_id
            """,
            [s.run_id for s in submissions],
            [s.idempotency_key or str(s.run_id) for s in submissions],
            [s.queue for s in submissions],
            [s.image for s in submissions],
            [json.dumps(list(s.command)) for s in submissions],
            [json.dumps(s.env) for s in submissions],
            [json.dumps(s.tags) for s in submissions],
            [s.max_runtime_s for s in submissions],
            [s.start_timeout_s for s in submissions],
            [s.max_retries for s in submissions],
            [
                json.dumps([r.value for r in s.retry_on]) if s.retry_on is not None else None
                for s in submissions
            ],
            [s.memory_limit_mb for s in submissions],
            [json.dumps(list(s.ready_check)) for s in submissions],
            [s.location for s in submissions],
            [s.job for s in submissions],
            [json.dumps(s.config) for s in submissions],
        )
        created_ids = {record["run_id"] for record in created}
        fresh = [s for s in submissions if s.run_id in created_ids]
        if not fresh:
            return []
        # The same run id may come twice in one batch; keep the first.
        by_id: dict[uuid.UUID, SubmitRun] = {}
        for submission in fresh:
            by_id.setdefault(submission.run_id, submission)
        fresh = list(by_id.values())
        launches = [_launch_for(s, 1) for s in fresh]
        await connection.execute(
            """
            INSERT INTO run_events (event_id, run_id, attempt, kind, from_state, to_state,
                                    payload)
            SELECT e.event_id, e.run_id, 1, 'SubmitRun', NULL, 'QUEUED', e.payload::jsonb
            FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS e(event_id, run_id, payload)
            ON CONFLICT (event_id) DO NOTHING
            """,
            [s.message_id for s in fresh],
            [s.run_id for s in fresh],
            [_payload_json(s) for s in fresh],
        )
        items = [
            OutboxItem(launch, INSTRUCTIONS_EXCHANGE, submit.queue)
            for submit, launch in zip(fresh, launches, strict=True)
        ]
        if announce:
            items += [answer(RunAccepted(run_id=s.run_id)) for s in fresh]
        await insert_outbox(connection, items)
        return [s.run_id for s in fresh]

    # ------------------------------------------------------------------- the outbox

    async def publish_outbox(
        self,
        publish: Callable[[Sequence[OutboxRow]], Awaitable[Mapping[int, str]]],
        limit: int = 500,
    ) -> int:
        """Hand up to ``limit`` unsent rows to ``publish``; mark them sent once it returns.

        ``publish`` returns the rows the broker refused (id → error): those are set aside
        with their error instead of being sent again and again.

        Rows are locked while they are published (SKIP LOCKED lets a second relay take other
        rows). If the process dies after publishing and before the commit, the rows are sent
        again: consumers are idempotent on the message id and the container name.
        """
        async with self._connection() as connection, connection.transaction():
            records = await connection.fetch(
                """
                SELECT id, exchange, routing_key, kind, message_id, payload, run_id, attempt
                FROM outbox
                WHERE sent_at IS NULL AND (not_before IS NULL OR not_before <= now())
                ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
                """,
                limit,
            )
            if not records:
                return 0
            rows = [
                OutboxRow(
                    r["id"],
                    r["exchange"],
                    r["routing_key"],
                    r["kind"],
                    r["message_id"],
                    r["payload"],
                    r["run_id"],
                    r["attempt"],
                )
                for r in records
            ]
            refused = await publish(rows)
            await connection.execute(
                "UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])",
                [r.id for r in rows if r.id not in refused],
            )
            for row in rows:
                if row.id in refused:
                    await self._set_aside(connection, row, refused[row.id])
            return len(rows)

    async def _set_aside(self, connection: asyncpg.Connection, row: OutboxRow, error: str) -> None:
        """A row the broker refuses is marked with the error, so that it never blocks the rows
        behind it; a LaunchRun's attempt fails (LAUNCH_ERROR) with the reason."""
        await connection.execute(
            "UPDATE outbox SET sent_at = now(), error = $2 WHERE id = $1", row.id, error[:2000]
        )
        log.error("outbox row %d (%s) set aside: %s", row.id, row.kind, error)
        if row.kind == "LaunchRun" and row.run_id is not None:
            failed = RunFailed(
                message_id=uuid.uuid5(row.message_id, "unpublishable"),
                run_id=row.run_id,
                attempt=row.attempt,
                reason=FailureReason.LAUNCH_ERROR,
                message=f"the instruction cannot be published: {error}"[:4000],
            )
            await self._apply_run_event(connection, failed)

    async def record_dead_letters(self, letters: Sequence[dead_letters.DeadLetterSeen]) -> None:
        """Count and alert on dead letters; a dead LaunchRun fails its attempt if still QUEUED."""
        async with self._connection() as connection, connection.transaction():
            await dead_letters.record(connection, letters)
            for letter in letters:
                failed = dead_letters.launch_failure(letter)
                # Only an attempt still waiting to launch: a dead LaunchRun never started a
                # container, and anyone who can publish a dead letter must not fail a live run.
                if failed is not None and await connection.fetchval(
                    "SELECT 1 FROM runs WHERE run_id = $1 AND attempt = $2 AND state = 'QUEUED'",
                    failed.run_id,
                    failed.attempt,
                ):
                    await self._apply_run_event(connection, failed)

    async def dead_letter_counts(self) -> list[dict[str, Any]]:
        async with self._connection() as connection:
            return await dead_letters.counts(connection)

    @asynccontextmanager
    async def listen_outbox(self) -> AsyncIterator[Callable[[float], Awaitable[None]]]:
        """A dedicated LISTEN connection; yields a function that waits for the next NOTIFY."""
        import asyncio

        settings = {"search_path": self._schema} if self._schema else {}
        try:
            connection = await asyncpg.connect(self._dsn, server_settings=settings, timeout=30)
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc!r}") from exc
        wake = asyncio.Event()

        def on_notify(*_: object) -> None:
            wake.set()

        async def wait(timeout: float = 5.0) -> None:
            try:
                await asyncio.wait_for(wake.wait(), timeout)
            except TimeoutError:
                if connection.is_closed():
                    raise StoreUnavailable("the LISTEN connection closed") from None
            wake.clear()

        try:
            await connection.add_listener(OUTBOX_CHANNEL, on_notify)
            yield wait
        finally:
            if not connection.is_closed():
                try:
                    await connection.close(timeout=5)
                except UNAVAILABLE:
                    connection.terminate()

    # --------------------------------------------------------------------- events

    async def apply_events(self, events: Sequence[Event]) -> int:
        """Apply status events idempotently in one transaction; returns state changes made."""
        changes = 0
        async with self._connection() as connection, connection.transaction():
            for event in events:
                if isinstance(event, AgentHeartbeat):
                    await self._record_heartbeat(connection, event)
                elif isinstance(event, RunLog):
                    await self._record_log(connection, event)
                elif isinstance(event, RunProgress):
                    await self._record_progress(connection, event)
                elif isinstance(event, RunAccepted | RunRejected | RunRetrying | RunEnded):
                    continue  # the control plane's own announcements: written by the store
                elif isinstance(event, LocationLoaded | LocationFailed):
                    from .locations import record_location_event

                    await record_location_event(connection, event)
                elif await self._apply_run_event(connection, event):
                    changes += 1
        return changes

    async def _apply_run_event(self, connection: asyncpg.Connection, event: RunEvent) -> bool:
        run = await connection.fetchrow(
            "SELECT * FROM runs WHERE run_id = $1 FOR UPDATE", event.run_id
        )
        if run is None:
            log.warning("event %s for unknown run %s ignored", type(event).__name__, event.run_id)
            return False
        current = RunState(run["state"])
        # Only the current attempt, and only from the agent that holds it once one does.
        owner, sender = run["agent_id"], getattr(event, "agent_id", None)
        foreign = owner is not None and sender is not None and sender != owner
        current_attempt = event.attempt == run["attempt"] and not foreign
        new = next_state(current, event) if current_attempt else None
        retry = (
            new == RunState.FAILURE
            and isinstance(event, RunFailed)
            and _policy(run).retries(event.reason, event.attempt)
        )
        if retry:
            new = RunState.QUEUED
        inserted = await _insert_event(connection, event, current if new else None, new)
        if not inserted or new is None:
            return False  # a redelivered event, a stale attempt, or no transition
        if retry:
            assert isinstance(event, RunFailed)
            await self._schedule_retry(connection, run, event)
        else:
            await self._update_run(connection, event, new)
            if new in TERMINAL:
                await _announce_end(connection, event, new)
            if new == RunState.FAILURE:
                assert isinstance(event, RunFailed)
                await alerts.raise_alert(
                    connection,
                    f"run-failed:{event.run_id}",
                    "run_failed",
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

    async def _schedule_retry(
        self, connection: asyncpg.Connection, run: asyncpg.Record, failed: RunFailed
    ) -> None:
        """The next attempt: the run goes back to QUEUED and a delayed LaunchRun is written."""
        attempt = failed.attempt + 1
        delay = backoff_s(failed.attempt, self.retry_backoff_s)
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
        launch = _launch_from_row(run, attempt)
        retrying = RunRetrying(
            run_id=failed.run_id,
            attempt=failed.attempt,
            next_attempt=attempt,
            reason=failed.reason,
            delay_s=delay,
            message=failed.message,
        )
        await insert_outbox(
            connection,
            [
                OutboxItem(launch, INSTRUCTIONS_EXCHANGE, run["queue"], delay),
                answer(retrying),
            ],
        )
        log.info(
            "run %s attempt %d failed (%s); attempt %d in %.1f s",
            failed.run_id,
            failed.attempt,
            failed.reason.value,
            attempt,
            delay,
        )

    async def _update_run(
        self, connection: asyncpg.Connection, event: RunEvent, new: RunState
    ) -> None:
        agent_id = getattr(event, "agent_id", None)
        container_id = getattr(event, "container_id", None)
        exit_code = getattr(event, "exit_code", None)
        tail = list(getattr(event, "output_tail", ()))
        reason = event.reason.value if isinstance(event, RunFailed) else None
        message = event.message if isinstance(event, RunFailed) else None
        finished = new in TERMINAL
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
            agent_id,
            container_id,
            finished,
            exit_code,
            reason,
            message,
            json.dumps(tail),
        )

    async def _record_log(self, connection: asyncpg.Connection, batch: RunLog) -> None:
        exists = await connection.fetchval("SELECT 1 FROM runs WHERE run_id = $1", batch.run_id)
        if not exists:
            log.warning("output of unknown run %s ignored", batch.run_id)
            return
        if batch.lines:
            await connection.execute(
                """
                INSERT INTO run_logs (run_id, attempt, line_no, line)
                SELECT $1, $2, $3 + l.n - 1, l.line
                FROM unnest($4::text[]) WITH ORDINALITY AS l(line, n)
                ON CONFLICT DO NOTHING
                """,
                batch.run_id,
                batch.attempt,
                batch.first_line,
                [line.replace("\x00", "") for line in batch.lines],
            )
        if batch.truncated:
            await connection.execute(
                "UPDATE runs SET log_truncated = true WHERE run_id = $1", batch.run_id
            )

    async def _record_progress(self, connection: asyncpg.Connection, batch: RunProgress) -> None:
        exists = await connection.fetchval("SELECT 1 FROM runs WHERE run_id = $1", batch.run_id)
        if not exists:
            log.warning("progress of unknown run %s ignored", batch.run_id)
            return
        items = batch.items
        await connection.execute(
            """
            INSERT INTO run_progress (run_id, attempt, item_no, event, step, status, duration_s,
                                      level, message, details)
            SELECT $1, $2, i.no, i.event, i.step, i.status, i.duration_s, i.level, i.message,
                   i.details::jsonb
            FROM unnest($3::int[], $4::text[], $5::text[], $6::text[], $7::float8[],
                        $8::text[], $9::text[], $10::text[])
                 AS i(no, event, step, status, duration_s, level, message, details)
            ON CONFLICT DO NOTHING
            """,
            batch.run_id,
            batch.attempt,
            [i.line_no for i in items],
            [i.event for i in items],
            [i.step for i in items],
            [i.status for i in items],
            [i.duration_s for i in items],
            [i.level for i in items],
            [i.message for i in items],
            [json.dumps(i.values, default=str) for i in items],
        )

    async def run_progress(self, run_id: uuid.UUID) -> list[dict[str, Any]]:
        """A run's progress items (steps, log records, metadata), in order."""
        async with self._connection() as connection:
            records = await connection.fetch(
                """
                SELECT attempt, item_no, event, step, status, duration_s, level, message, details
                FROM run_progress WHERE run_id = $1 ORDER BY attempt, item_no
                """,
                run_id,
            )
        return [{**dict(r), "details": json.loads(r["details"])} for r in records]

    async def run_logs(
        self, run_id: uuid.UUID, attempt: int | None = None, limit: int = 100_000
    ) -> list[tuple[int, int, str]]:
        """(attempt, line number, line) of a run's forwarded output, in order."""
        async with self._connection() as connection:
            records = await connection.fetch(
                """
                SELECT attempt, line_no, line FROM run_logs
                WHERE run_id = $1 AND ($2::int IS NULL OR attempt = $2)
                ORDER BY attempt, line_no LIMIT $3
                """,
                run_id,
                attempt,
                limit,
            )
        return [(r["attempt"], r["line_no"], r["line"]) for r in records]

    async def _record_heartbeat(self, connection: asyncpg.Connection, beat: AgentHeartbeat) -> None:
        await connection.execute(
            """
            INSERT INTO agents (agent_id, queues, max_concurrent, in_flight, last_sequence,
                                interval_s, last_heartbeat_at)
            VALUES ($1, $2::jsonb, $3, $4::jsonb, $5, $6, now())
            ON CONFLICT (agent_id) DO UPDATE SET
                queues = EXCLUDED.queues, max_concurrent = EXCLUDED.max_concurrent,
                in_flight = EXCLUDED.in_flight, last_sequence = EXCLUDED.last_sequence,
                interval_s = EXCLUDED.interval_s, last_heartbeat_at = now()
            """,
            beat.agent_id,
            json.dumps(list(beat.queues)),
            beat.max_concurrent,
            msgspec.json.encode(beat.in_flight).decode(),
            beat.sequence,
            beat.interval_s,
        )

    # -------------------------------------------------------------------- reading

    async def run_exists(self, run_id: uuid.UUID) -> bool:
        async with self._connection() as connection:
            return bool(await connection.fetchval("SELECT 1 FROM runs WHERE run_id = $1", run_id))

    async def get_run(self, run_id: uuid.UUID) -> RunRow:
        async with self._connection() as connection:
            record = await connection.fetchrow("SELECT * FROM runs WHERE run_id = $1", run_id)
        if record is None:
            raise RunNotFound(f"no run {run_id}")
        return RunRow.from_record(record)

    async def find_run(self, prefix: str) -> RunRow:
        """A run by id or unambiguous id prefix (as printed by ``runs list``)."""
        try:
            return await self.get_run(uuid.UUID(prefix))
        except ValueError:
            pass
        async with self._connection() as connection:
            records = await connection.fetch(
                "SELECT * FROM runs WHERE run_id::text LIKE $1 || '%' LIMIT 2", prefix.lower()
            )
        if not records:
            raise RunNotFound(f"no run with id {prefix!r}")
        if len(records) > 1:
            raise RunNotFound(f"run id prefix {prefix!r} is ambiguous; give more characters")
        return RunRow.from_record(records[0])

    async def list_runs(self, state: RunState | None = None, limit: int = 50) -> list[RunRow]:
        async with self._connection() as connection:
            records = await connection.fetch(
                """
                SELECT * FROM runs WHERE ($1::text IS NULL OR state = $1)
                ORDER BY created_at DESC, run_id LIMIT $2
                """,
                state.value if state else None,
                limit,
            )
        return [RunRow.from_record(r) for r in records]

    async def run_events(self, run_id: uuid.UUID) -> list[RunEventRow]:
        async with self._connection() as connection:
            records = await connection.fetch(
                """
                SELECT seq, kind, attempt, from_state, to_state, recorded_at, payload
                FROM run_events WHERE run_id = $1 ORDER BY seq
                """,
                run_id,
            )
        return [
            RunEventRow(
                r["seq"],
                r["kind"],
                r["attempt"],
                r["from_state"],
                r["to_state"],
                r["recorded_at"],
                json.loads(r["payload"]),
            )
            for r in records
        ]

    async def list_agents(self) -> list[dict[str, Any]]:
        """Every agent the control plane has heard of, most recently heard first."""
        async with self._connection() as connection:
            records = await connection.fetch(
                """
                SELECT agent_id, status, queues, max_concurrent, in_flight, last_sequence,
                       first_seen_at, last_heartbeat_at, lost_at,
                       EXTRACT(EPOCH FROM now() - last_heartbeat_at)::float8 AS silent_s
                FROM agents ORDER BY last_heartbeat_at DESC
                """
            )
        return [
            {**dict(r), "queues": json.loads(r["queues"]), "in_flight": json.loads(r["in_flight"])}
            for r in records
        ]

    async def list_alerts(self, limit: int = 50) -> list[dict[str, Any]]:
        """Alerts, newest first, each with the delivery state of every webhook."""
        async with self._connection() as connection:
            records = await connection.fetch(
                """
                SELECT a.id, a.dedupe_key, a.kind, a.message, a.created_at, a.logged_at,
                       COALESCE(json_agg(json_build_object(
                           'url', d.url, 'attempts', d.attempts,
                           'delivered_at', d.delivered_at, 'last_error', d.last_error))
                         FILTER (WHERE d.url IS NOT NULL), '[]') AS deliveries
                FROM alerts a LEFT JOIN alert_deliveries d ON d.alert_id = a.id
                GROUP BY a.id ORDER BY a.id DESC LIMIT $1
                """,
                limit,
            )
        return [{**dict(r), "deliveries": json.loads(r["deliveries"])} for r in records]

    async def count_by_state(self) -> dict[str, int]:
        async with self._connection() as connection:
            records = await connection.fetch("SELECT state, count(*) AS n FROM runs GROUP BY state")
        counts = {state.value: 0 for state in RunState}
        counts.update({r["state"]: int(r["n"]) for r in records})
        return counts

    async def count_unsent(self, kind: str | None = None) -> int:
        """Outbox rows not yet published (of one message kind, if given)."""
        async with self._connection() as connection:
            return int(
                await connection.fetchval(
                    "SELECT count(*) FROM outbox WHERE sent_at IS NULL"
                    " AND ($1::text IS NULL OR kind = $1)",
                    kind,
                )
            )


def _payload_json(message: msgspec.Struct) -> str:
    return msgspec.json.encode(message).decode()


@dataclass(frozen=True)
class OutboxItem:
    """A message to publish once the transaction commits, after ``delay_s`` if given."""

    message: Message
    exchange: str
    routing_key: str
    delay_s: float = 0.0


async def insert_outbox(connection: asyncpg.Connection, items: Sequence[OutboxItem]) -> int:
    """Write outbox rows; a row whose message id exists already is skipped (idempotent).

    Returns how many rows were written.
    """
    status = await connection.execute(
        """
        INSERT INTO outbox (message_id, run_id, attempt, exchange, routing_key, kind, payload,
                            not_before)
        SELECT o.message_id, o.run_id, o.attempt, o.exchange, o.routing_key, o.kind, o.payload,
               CASE WHEN o.delay > 0 THEN now() + o.delay * interval '1 second' END
        FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[],
                    $7::bytea[], $8::float8[])
             AS o(message_id, run_id, attempt, exchange, routing_key, kind, payload, delay)
        ON CONFLICT (message_id) DO NOTHING
        """,
        [i.message.message_id for i in items],
        [getattr(i.message, "run_id", None) for i in items],
        [getattr(i.message, "attempt", 0) for i in items],
        [i.exchange for i in items],
        [i.routing_key for i in items],
        [kind_of(i.message) for i in items],
        [encode(i.message) for i in items],
        [i.delay_s for i in items],
    )
    written = int(status.split()[-1])
    if written:
        # Delivered at commit: the relay wakes with no polling delay.
        await connection.execute(f"NOTIFY {OUTBOX_CHANNEL}")
    return written


async def _insert_event(
    connection: asyncpg.Connection,
    event: RunEvent,
    from_state: RunState | None,
    to_state: RunState | None,
) -> bool:
    """Append an event; False when its id was recorded before (a redelivery)."""
    seq = await connection.fetchval(
        """
        INSERT INTO run_events (event_id, run_id, attempt, kind, from_state, to_state, payload)
        VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
        ON CONFLICT (event_id) DO NOTHING
        RETURNING seq
        """,
        event.message_id,
        event.run_id,
        event.attempt,
        type(event).__name__,
        from_state.value if from_state else None,
        to_state.value if to_state else None,
        _payload_json(event),
    )
    return seq is not None


def _policy(run: asyncpg.Record) -> RetryPolicy:
    retry_on = run["retry_on"]
    return RetryPolicy(
        max_retries=DEFAULT_MAX_RETRIES if run["max_retries"] is None else run["max_retries"],
        retry_on=(
            DEFAULT_RETRY_ON
            if retry_on is None
            else tuple(FailureReason(r) for r in json.loads(retry_on))
        ),
    )


def _launch_from_row(run: asyncpg.Record, attempt: int) -> LaunchRun:
    return LaunchRun(
        run_id=run["run_id"],
        attempt=attempt,
        image=run["image"],
        command=tuple(json.loads(run["command"])),
        env=json.loads(run["env"]),
        tags=json.loads(run["tags"]),
        max_runtime_s=run["max_runtime_s"],
        memory_limit_mb=run["memory_limit_mb"],
        ready_check=tuple(json.loads(run["ready_check"])),
        location=run["location"],
        job=run["job"],
        config=json.loads(run["config"]),
    )


def answer(message: RunAccepted | RunRejected | RunEnded | RunRetrying) -> OutboxItem:
    """An announcement of the control plane's to the run's followers, through the outbox."""
    return OutboxItem(message, STATUS_EXCHANGE, event_routing_key(message, CONTROL_SOURCE))


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
    await insert_outbox(connection, [answer(ended)])
