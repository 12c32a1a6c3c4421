"""A run's forwarded output (numbered lines) and progress items (steps, log records, metadata).

Both are keyed by (run, attempt, number): a redelivered batch inserts nothing twice.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import asyncpg

from schemas import RunLog, RunProgress

from .connections import Connections

log = logging.getLogger(__name__)


async def _its_own(connection: asyncpg.Connection, batch: RunLog | RunProgress) -> bool:
    """The batch's agent ran that attempt: it holds the run's current attempt, or its launch
    of the earlier one moved the run (a refused claim, a stray launch are recorded too, and
    prove nothing). Any agent may publish output: another's lines, written first under the
    same numbers, would stand in for the real ones."""
    return bool(
        await connection.fetchval(
            """
            SELECT CASE WHEN r.attempt = $2 THEN r.agent_id = $3
                        ELSE EXISTS (
                            SELECT 1 FROM run_events e
                            WHERE e.run_id = r.run_id AND e.attempt = $2
                              AND e.kind = 'RunLaunched' AND e.to_state IS NOT NULL
                              AND e.payload->>'agent_id' = $3)
                   END
            FROM runs r WHERE r.run_id = $1
            """,
            batch.run_id,
            batch.attempt,
            batch.agent_id,
        )
    )


async def record_log(connection: asyncpg.Connection, batch: RunLog) -> None:
    if not await _its_own(connection, batch):
        log.warning(
            "output of run %s attempt %d from agent %s ignored: no such run, or not its attempt",
            batch.run_id,
            batch.attempt,
            batch.agent_id,
        )
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


async def record_progress(connection: asyncpg.Connection, batch: RunProgress) -> None:
    if not await _its_own(connection, batch):
        log.warning(
            "progress of run %s attempt %d from agent %s ignored: no such run, or not its attempt",
            batch.run_id,
            batch.attempt,
            batch.agent_id,
        )
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


class Output:
    """Reading a run's output and progress."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def progress(self, run_id: uuid.UUID) -> list[dict[str, Any]]:
        """A run's progress items (steps, log records, metadata), in order."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                """
                SELECT attempt, item_no, event, step, status, duration_s, level, message, details,
                       recorded_at
                FROM run_progress WHERE run_id = $1 ORDER BY attempt, item_no
                """,
                run_id,
            )
        return [
            {
                **dict(r),
                "details": json.loads(r["details"]),
                "recorded_at": r["recorded_at"].isoformat(),
            }
            for r in records
        ]

    async def lines(
        self, run_id: uuid.UUID, attempt: int | None = None, limit: int = 100_000
    ) -> list[tuple[int, int, str]]:
        """(attempt, line number, line) of a run's forwarded output, in order."""
        async with self._connections.connection() as connection:
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

    async def page(
        self,
        run_id: uuid.UUID,
        attempt: int | None,
        after: tuple[int, int],
        limit: int,
    ) -> list[tuple[int, int, str]]:
        """(attempt, line number, line) after ``after`` (an attempt and line number), in order."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                """
                SELECT attempt, line_no, line FROM run_logs
                WHERE run_id = $1 AND ($2::int IS NULL OR attempt = $2)
                  AND (attempt, line_no) > ($3, $4)
                ORDER BY attempt, line_no LIMIT $5
                """,
                run_id,
                attempt,
                after[0],
                after[1],
                limit,
            )
        return [(r["attempt"], r["line_no"], r["line"]) for r in records]
