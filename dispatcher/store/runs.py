"""Runs: creating them from submissions, and reading them with their event history.

How events move a run between states is ``events.py``'s; this module owns the rows.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from schemas import FailureReason, LaunchRun, RunAccepted, RunRejected, SubmitRun
from schemas.envelope import AttemptMessage
from schemas.topology import INSTRUCTIONS_EXCHANGE

from ..errors import RunNotFound
from ..retries import DEFAULT_MAX_RETRIES, DEFAULT_RETRY_ON, RetryPolicy
from ..states import RunState
from ..submitters import ANYWHERE, Limits
from . import answers, limits, outbox
from .connections import Connections

#: The namespace of the stored ids of requests' events (see ``request_event_id``).
_REQUESTS = uuid.UUID("0c6a3f8e-91b4-4f57-8d2e-7a1e5b9c4d60")


def request_event_id(kind: str, message_id: uuid.UUID) -> uuid.UUID:
    """The id a request (SubmitRun, CancelRun) is recorded under in its run's history: one
    derived from the id its sender chose, so that no sender can take the id of a decision of
    the control plane's or the monitor's to come (it would be skipped as a redelivery)."""
    return uuid.uuid5(_REQUESTS, f"{kind}/{message_id}")


#: Columns of ``runs`` stored as JSON text.
_JSON_COLUMNS = ("command", "env", "tags", "ready_check", "config", "output_tail")
#: What a LaunchRun carries of its run (the attempt header aside).
_LAUNCH_FIELDS = tuple(
    f for f in LaunchRun.__struct_fields__ if f not in AttemptMessage.__struct_fields__
)


def decoded(record: asyncpg.Record) -> dict[str, Any]:
    """A ``runs`` row as a dict, JSON columns decoded."""
    row = dict(record)
    for column in _JSON_COLUMNS:
        if column in row:
            row[column] = json.loads(row[column])
    return row


def launch(run: Mapping[str, Any], attempt: int) -> LaunchRun:
    """The instruction for ``attempt`` of a run (a submission's fields or a decoded row)."""
    fields = {name: run[name] for name in _LAUNCH_FIELDS}
    fields["command"] = tuple(fields["command"])
    fields["ready_check"] = tuple(fields["ready_check"])
    return LaunchRun(run_id=run["run_id"], attempt=attempt, **fields)


_REASONS = frozenset(reason.value for reason in FailureReason)


def retry_policy(run: Mapping[str, Any]) -> RetryPolicy:
    retry_on = run["retry_on"]
    return RetryPolicy(
        max_retries=DEFAULT_MAX_RETRIES if run["max_retries"] is None else run["max_retries"],
        retry_on=(
            DEFAULT_RETRY_ON
            if retry_on is None
            # A reason this release does not know (a newer one wrote it: a rolling upgrade,
            # a rollback) is one no failure here has: left out rather than fail the read.
            else tuple(FailureReason(r) for r in json.loads(retry_on) if r in _REASONS)
        ),
    )


def payload_json(value: object) -> str:
    """A message, or a value, as JSON text for a jsonb column (msgspec: a twentieth of
    ``json.dumps``'s time, which the intake used to spend five times a run)."""
    return msgspec.json.encode(value).decode()


#: What may start a run id: hex digits and dashes.
_ID_PREFIX = re.compile(r"[0-9a-fA-F-]{1,36}")


#: The namespace of the message ids of refusals kept for submissions that could not be
#: decoded (``RunsStore.refuse_unknown``).
_REFUSED = uuid.UUID("5d0c2f8e-7b0a-4d38-9c51-2b8a3e7f6a10")


@dataclass(frozen=True)
class RunEventRow:
    seq: int
    kind: str
    attempt: int
    from_state: str | None
    to_state: str | None
    recorded_at: datetime
    payload: dict[str, Any]


def _event_row(r: asyncpg.Record) -> RunEventRow:
    return RunEventRow(
        r["seq"],
        r["kind"],
        r["attempt"],
        r["from_state"],
        r["to_state"],
        r["recorded_at"],
        json.loads(r["payload"]),
    )


@dataclass(frozen=True)
class RunFilters:
    """What a listing of runs keeps; None keeps everything."""

    state: str | None = None
    queue: str | None = None
    location: str | None = None
    tags: dict[str, str] | None = None
    since: datetime | None = None
    until: datetime | None = None
    #: A token's limits: only runs on these queues, of these locations (empty: any).
    within: Limits = ANYWHERE


def _within(first: int) -> str:
    """The condition that a run ``r`` is within a token's limits: its queues as parameter
    ``first``, its locations as the next (an empty list limits nothing)."""
    queues, locations = f"${first}::text[]", f"${first + 1}::text[]"
    return (
        f"(cardinality({queues}) = 0 OR r.queue = ANY({queues}))"
        f" AND (cardinality({locations}) = 0 OR r.location = ANY({locations}))"
    )


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
    location: str | None
    job: str | None
    submitted_by: str | None
    memory_limit_mb: int | None
    cpus: float | None
    gpus: int
    priority: int
    #: Held back by a concurrency limit (QUEUED, no LaunchRun yet); ``held_by`` names it.
    held: bool
    held_by: str | None

    @property
    def waiting_on(self) -> str | None:
        """What this run waits for while a limit holds it ("limit tag:team=ml")."""
        if not self.held or self.state != RunState.QUEUED:
            return None
        return f"limit {self.held_by}" if self.held_by else "a concurrency limit"

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> RunRow:
        row = decoded(record)
        fields = {name: row[name] for name in cls.__dataclass_fields__}
        fields["state"] = RunState(row["state"])
        return cls(**fields)


async def create(
    connection: asyncpg.Connection,
    submissions: Sequence[SubmitRun],
    announce: bool = False,
    handed: list[outbox.OutboxItem] | None = None,
    in_force: list[limits.Limit] | None = None,
) -> list[uuid.UUID]:
    """Insert runs, their first events and LaunchRun rows (and RunAccepted if ``announce``).

    A run that falls under a concurrency limit is inserted held, with no LaunchRun: the
    admitter (``limits.admit``) writes it once every limit has room.

    With ``handed``, the LaunchRun rows are written leased to the caller (``outbox.LEASE_S``:
    no relay's round takes them before) and those of the runs created are put in ``handed``,
    for the caller to publish once the transaction committed (``OutboxRelay.hand_off``).
    ``in_force``: the limits in force, when the caller read them already.

    A submission whose run id or idempotency key exists already creates nothing; the ids of
    the runs created now are returned.
    """
    if not submissions:
        return []
    if in_force is None:
        in_force = await limits.in_force(connection)
    # The same run id may come twice in one batch: the first is inserted, and only its event
    # and instruction are written.
    first: dict[uuid.UUID, int] = {}
    for index, submission in enumerate(submissions):
        first.setdefault(submission.run_id, index)
    unique = [submissions[i] for i in first.values()]
    held = [limits.holds(in_force, s) for s in unique]
    lease = outbox.LEASE_S if handed is not None else 0.0
    launches = {
        s.run_id: outbox.OutboxItem(
            launch(msgspec.structs.asdict(s), 1), INSTRUCTIONS_EXCHANGE, s.queue, lease
        )
        for s, h in zip(unique, held, strict=True)
        if not h
    }
    items = list(launches.values())
    if announce:
        items += [outbox.answer(RunAccepted(run_id=s.run_id)) for s in unique]
    # One statement: the runs, then the first event and the outbox rows of those created
    # (not of those whose id or idempotency key existed already).
    created = await connection.fetch(
        f"""
        WITH created AS (
            INSERT INTO runs (run_id, idempotency_key, queue, image, command, env, tags,
                              max_runtime_s, start_timeout_s, max_retries, retry_on,
                              memory_limit_mb, ready_check, location, job, config,
                              queue_timeout_s, cpus, gpus, priority, held, submitted_by,
                              submit_seq, state)
            SELECT r.run_id, r.key, r.queue, r.image, r.command::jsonb, r.env::jsonb,
                   r.tags::jsonb, r.max_runtime_s, r.start_timeout_s, r.max_retries,
                   r.retry_on::jsonb, r.memory_limit_mb, r.ready_check::jsonb,
                   r.location, r.job, r.config::jsonb, r.queue_timeout_s,
                   r.cpus, r.gpus, r.priority, r.held, r.submitted_by,
                   nextval('runs_submit_seq'), 'QUEUED'
            FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                        $6::text[], $7::text[], $8::float8[], $9::float8[], $10::int[],
                        $11::text[], $12::int[], $13::text[], $14::text[], $15::text[],
                        $16::text[], $17::float8[], $18::float8[], $19::int[], $20::int[],
                        $21::bool[], $22::text[]) WITH ORDINALITY
                 AS r(run_id, key, queue, image, command, env, tags, max_runtime_s,
                      start_timeout_s, max_retries, retry_on, memory_limit_mb, ready_check,
                      location, job, config, queue_timeout_s, cpus, gpus, priority, held,
                      submitted_by, ord)
            ORDER BY r.ord
            ON CONFLICT DO NOTHING
            RETURNING run_id
        ), first_events AS (
            INSERT INTO run_events (event_id, run_id, attempt, kind, from_state, to_state,
                                    payload)
            SELECT e.event_id, e.run_id, 1, 'SubmitRun', NULL, 'QUEUED', e.payload::jsonb
            FROM unnest($23::uuid[], $24::uuid[], $25::text[]) WITH ORDINALITY
                 AS e(event_id, run_id, payload, ord)
            JOIN created ON created.run_id = e.run_id
            ORDER BY e.ord
            ON CONFLICT (event_id) DO NOTHING
        ), instructions AS ({outbox.rows_sql(26, only="created")})
        SELECT run_id FROM created
        """,
        [s.run_id for s in unique],
        [s.idempotency_key or str(s.run_id) for s in unique],
        [s.queue for s in unique],
        [s.image for s in unique],
        [payload_json(s.command) for s in unique],
        [payload_json(s.env) for s in unique],
        [payload_json(s.tags) for s in unique],
        [s.max_runtime_s for s in unique],
        [s.start_timeout_s for s in unique],
        [s.max_retries for s in unique],
        [payload_json(s.retry_on) if s.retry_on is not None else None for s in unique],
        [s.memory_limit_mb for s in unique],
        [payload_json(s.ready_check) for s in unique],
        [s.location for s in unique],
        [s.job for s in unique],
        [payload_json(s.config) for s in unique],
        [s.queue_timeout_s for s in unique],
        [s.cpus for s in unique],
        [s.gpus for s in unique],
        [s.priority for s in unique],
        held,
        [s.submitted_by for s in unique],
        [request_event_id("SubmitRun", s.message_id) for s in unique],
        [s.run_id for s in unique],
        [payload_json(s) for s in unique],
        *outbox.arrays(items),
    )
    created_ids = {record["run_id"] for record in created}
    fresh = [s.run_id for s in unique if s.run_id in created_ids]
    if handed is not None:
        handed += [item for run_id, item in launches.items() if run_id in created_ids]
    held_ids = {s.run_id for s, h in zip(unique, held, strict=True) if h}
    if held_ids & created_ids:
        await limits.wake_admitter(connection)
    return fresh


async def existing(connection: asyncpg.Connection, run_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``run_ids`` are runs."""
    if not run_ids:
        return set()
    records = await connection.fetch(
        "SELECT run_id FROM runs WHERE run_id = ANY($1::uuid[])", list(run_ids)
    )
    return {r["run_id"] for r in records}


class Runs:
    """Runs and their history, read and created."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def create(self, submissions: Sequence[SubmitRun]) -> list[uuid.UUID]:
        """Create runs with their LaunchRun outbox rows in one transaction (see ``create``)."""
        if not submissions:
            return []
        async with self._connections.transaction() as connection:
            return await create(connection, submissions)

    async def refuse_unknown(self, run_id: uuid.UUID, reason: str) -> bool:
        """Keep a ``RunRejected`` of ``run_id`` in the outbox, for the relay to publish and for
        an ask to find (``answers.kept_refusal``), unless a run of that id exists: a forged
        submission must not fail someone else's wait. One at most for a run id (its message
        id is derived from it): a sender repeating a poisoned submission adds no row. True
        when it was kept."""
        rejected = RunRejected(
            message_id=uuid.uuid5(_REFUSED, str(run_id)), run_id=run_id, reason=reason
        )
        async with self._connections.connection() as connection:
            status = await connection.execute(
                "WITH unknown AS (SELECT $9::uuid AS run_id"
                " WHERE NOT EXISTS (SELECT 1 FROM runs WHERE run_id = $9))"
                + outbox.rows_sql(1, only="unknown"),
                *outbox.arrays([outbox.answer(rejected)]),
                rejected.run_id,
            )
        return int(status.split()[-1]) > 0

    async def exists(self, run_id: uuid.UUID) -> bool:
        async with self._connections.connection() as connection:
            return bool(await connection.fetchval("SELECT 1 FROM runs WHERE run_id = $1", run_id))

    async def get(self, run_id: uuid.UUID) -> RunRow:
        async with self._connections.connection() as connection:
            record = await connection.fetchrow("SELECT * FROM runs WHERE run_id = $1", run_id)
        if record is None:
            raise RunNotFound(f"no run {run_id}")
        return RunRow.from_record(record)

    async def find(self, prefix: str) -> RunRow:
        """A run by id or unambiguous id prefix (as printed by ``runs list``)."""
        try:
            return await self.get(uuid.UUID(prefix))
        except ValueError:
            pass
        if not _ID_PREFIX.fullmatch(prefix):
            # Hex digits and dashes only: '%' or '_' would be LIKE's wildcards, and
            # `runs cancel %abc` would have canceled the one run whose id holds "abc".
            raise RunNotFound(f"{prefix!r} is no run id, nor the start of one")
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                "SELECT * FROM runs WHERE run_id::text LIKE $1 || '%' LIMIT 2", prefix.lower()
            )
        if not records:
            raise RunNotFound(f"no run with id {prefix!r}")
        if len(records) > 1:
            raise RunNotFound(f"run id prefix {prefix!r} is ambiguous; give more characters")
        return RunRow.from_record(records[0])

    async def recent(self, state: RunState | None = None, limit: int = 50) -> list[RunRow]:
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                """
                SELECT * FROM runs WHERE ($1::text IS NULL OR state = $1)
                ORDER BY created_at DESC, run_id LIMIT $2
                """,
                state.value if state else None,
                limit,
            )
        return [RunRow.from_record(r) for r in records]

    async def page(
        self,
        filters: RunFilters,
        limit: int = 50,
        before: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[RunRow]:
        """Runs newest first, filtered; ``before`` is the (created_at, run_id) of the last run
        of the previous page (a keyset cursor: stable while runs are added)."""
        # Only the filters given go into the query (as fixed fragments; every value is a
        # parameter), so that the planner sees each one and picks its index.
        wanted: list[tuple[str, object]] = [
            ("state = ${}", filters.state),
            ("queue = ${}", filters.queue),
            ("location = ${}", filters.location),
            ("tags @> ${}::jsonb", json.dumps(filters.tags) if filters.tags else None),
            ("created_at >= ${}", filters.since),
            ("created_at < ${}", filters.until),
            ("queue = ANY(${}::text[])", list(filters.within.queues) or None),
            ("location = ANY(${}::text[])", list(filters.within.locations) or None),
        ]
        clauses, values = [], []
        for fragment, value in wanted:
            if value is not None:
                values.append(value)
                clauses.append(fragment.format(len(values)))
        if before is not None:
            values += [before[0], before[1]]
            clauses.append(f"(created_at, run_id) < (${len(values) - 1}, ${len(values)}::uuid)")
        values.append(limit)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        query = (
            f"SELECT * FROM runs {where} ORDER BY created_at DESC, run_id DESC LIMIT ${len(values)}"
        )
        async with self._connections.connection() as connection:
            records = await connection.fetch(query, *values)
        return [RunRow.from_record(r) for r in records]

    async def in_reach(self, run_ids: Collection[uuid.UUID], within: Limits) -> set[uuid.UUID]:
        """Those of ``run_ids`` that exist on ``within``'s queues and of its locations."""
        if not run_ids:
            return set()
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                f"SELECT run_id FROM runs r WHERE run_id = ANY($1::uuid[]) AND {_within(2)}",
                list(run_ids),
                list(within.queues),
                list(within.locations),
            )
        return {r["run_id"] for r in records}

    async def events_after(
        self,
        seq: int,
        run_id: uuid.UUID | None = None,
        upto: int | None = None,
        limit: int = 500,
        within: Limits = ANYWHERE,
    ) -> list[tuple[uuid.UUID, RunEventRow]]:
        """Every run's events (or one run's) with a sequence number above ``seq`` (and at most
        ``upto``), in order; only of runs on ``within``'s queues and locations, if it has any."""
        # Within a token's limits, the runs' table is joined; without, it is not read.
        limited = f"AND EXISTS (SELECT 1 FROM runs r WHERE r.run_id = e.run_id AND {_within(5)})"
        bounded = within.bounded
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                f"""
                SELECT e.run_id, e.seq, e.kind, e.attempt, e.from_state, e.to_state,
                       e.recorded_at, e.payload
                FROM run_events e
                WHERE e.seq > $1 AND ($2::uuid IS NULL OR e.run_id = $2)
                  AND ($3::bigint IS NULL OR e.seq <= $3) {limited if bounded else ""}
                ORDER BY e.seq LIMIT $4
                """,
                seq,
                run_id,
                upto,
                limit,
                *((list(within.queues), list(within.locations)) if bounded else ()),
            )
        return [(r["run_id"], _event_row(r)) for r in records]

    async def sequence_after(
        self, seq: int, limit: int = 1000
    ) -> tuple[list[tuple[int, float]], bool]:
        """The event sequence numbers visible above ``seq``, in order, each with its row's
        age in seconds; and whether no other transaction is open (then every gap is final:
        numbers taken by inserts that rolled back, or that conflicted)."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                """
                SELECT seq, extract(epoch FROM clock_timestamp() - recorded_at)::float8 AS age
                FROM run_events WHERE seq > $1 ORDER BY seq LIMIT $2
                """,
                seq,
                limit,
            )
            quiet = await connection.fetchval(
                "SELECT pg_snapshot_xmin(s) = pg_snapshot_xmax(s) FROM pg_current_snapshot() s"
            )
        return [(r["seq"], r["age"]) for r in records], bool(quiet)

    async def prior(
        self, run_id: uuid.UUID, idempotency_key: str | None = None
    ) -> tuple[uuid.UUID, str | None] | None:
        """The run that has this id or this idempotency key already, and who submitted it."""
        async with self._connections.connection() as connection:
            record = await connection.fetchrow(
                """
                SELECT run_id, submitted_by FROM runs
                WHERE run_id = $1 OR idempotency_key = $2 ORDER BY run_id = $1 DESC LIMIT 1
                """,
                run_id,
                idempotency_key or str(run_id),
            )
        return None if record is None else (record["run_id"], record["submitted_by"])

    async def answer(self, run_id: uuid.UUID) -> tuple[uuid.UUID | None, str | None]:
        """What the intake made of a submission: (its run, once it exists; why it was
        refused)."""
        async with self._connections.connection() as connection:
            found = await connection.fetchval("SELECT run_id FROM runs WHERE run_id = $1", run_id)
            if found is not None:
                return found, None
            return None, await answers.kept_refusal(connection, run_id)

    async def last_event_seq(self) -> int:
        async with self._connections.connection() as connection:
            return int(await connection.fetchval("SELECT coalesce(max(seq), 0) FROM run_events"))

    async def events(self, run_id: uuid.UUID) -> list[RunEventRow]:
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                """
                SELECT seq, kind, attempt, from_state, to_state, recorded_at, payload
                FROM run_events WHERE run_id = $1 ORDER BY seq
                """,
                run_id,
            )
        return [_event_row(r) for r in records]

    async def count_by_state(self) -> dict[str, int]:
        async with self._connections.connection() as connection:
            records = await connection.fetch("SELECT state, count(*) AS n FROM runs GROUP BY state")
        counts = {state.value: 0 for state in RunState}
        counts.update({r["state"]: int(r["n"]) for r in records})
        return counts
