"""The admission pass: held runs get their LaunchRun once every limit they fall under has room
(what a limit is and counts: ``limits.py``)."""

from __future__ import annotations

import uuid

import asyncpg

from schemas.topology import INSTRUCTIONS_EXCHANGE

from . import outbox, runs
from .connections import Connections
from .limits import ADMIT_LOCK, COVERS, HOLDING

#: Names the Admitted events' ids (one per attempt: it is let go once).
_ADMITTED = uuid.UUID("6d1c5a52-3f0e-4b8e-9a57-0c2f4f1d9a31")


async def admit(connection: asyncpg.Connection, batch: int = 1000) -> int:
    """One admission pass (in the caller's transaction): write the LaunchRun of every held
    run whose limits all have room, in priority order, up to ``batch`` of them; returns how
    many were admitted.

    Each round reads only held runs that no full limit covers, so runs behind any number of
    blocked ones are reached; the first run of a round always fits, so rounds end."""
    await connection.execute("SELECT pg_advisory_xact_lock($1)", ADMIT_LOCK)
    usage = {
        r["key"]: (int(r["running"]), int(r["max_running"]))
        for r in await connection.fetch(
            f"""
            SELECT l.key, l.max_running,
                   (SELECT count(*) FROM runs r WHERE {HOLDING} AND {COVERS}) AS running
            FROM limits l
            """
        )
    }
    admitted: dict[uuid.UUID, str | None] = {}  # run id -> the limit that held it last
    while len(admitted) < batch:
        wanted, before = batch - len(admitted), len(admitted)
        candidates = await connection.fetch(
            f"""
            SELECT r.run_id, r.held_by,
                   array(SELECT l.key FROM limits l WHERE {COVERS} ORDER BY l.key) AS keys
            FROM runs r
            WHERE r.held AND r.state = 'QUEUED' AND NOT (r.run_id = ANY($3::uuid[]))
              AND NOT EXISTS (SELECT 1 FROM limits l WHERE l.key = ANY($2::text[]) AND {COVERS})
            ORDER BY r.priority DESC, r.submit_seq, r.created_at, r.run_id
            LIMIT $1 FOR UPDATE OF r SKIP LOCKED
            """,
            wanted,
            _full(usage),
            list(admitted),
        )
        for run in candidates:
            if any(usage[key][0] >= usage[key][1] for key in run["keys"]):
                continue  # a limit filled up earlier in this round
            for key in run["keys"]:
                running, most = usage[key]
                usage[key] = (running + 1, most)
            admitted[run["run_id"]] = run["held_by"]
        if len(candidates) < wanted or len(admitted) == before:
            break
    items = []
    if admitted:
        rows = await connection.fetch(
            """
            UPDATE runs SET held = false, held_by = NULL, updated_at = now()
            WHERE run_id = ANY($1::uuid[]) RETURNING *
            """,
            list(admitted),
        )
        for record in rows:
            run = runs.decoded(record)
            items.append(
                outbox.OutboxItem(
                    runs.launch(run, run["attempt"]), INSTRUCTIONS_EXCHANGE, run["queue"]
                )
            )
        # In the run's history: when it was let go, and which limit had held it.
        await connection.execute(
            """
            INSERT INTO run_events (event_id, run_id, attempt, kind, payload)
            SELECT e.event_id, e.run_id, e.attempt, 'Admitted',
                   jsonb_build_object('held_by', e.held_by)
            FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[])
                 AS e(event_id, run_id, attempt, held_by)
            ON CONFLICT (event_id) DO NOTHING
            """,
            [uuid.uuid5(_ADMITTED, f"{r['run_id']}/{r['attempt']}") for r in rows],
            [r["run_id"] for r in rows],
            [r["attempt"] for r in rows],
            [admitted[r["run_id"]] for r in rows],
        )
        await outbox.insert(connection, items)
    # What the first held runs wait for, for the listings (the rest are seen as they rise).
    await connection.execute(
        f"""
        UPDATE runs u SET held_by = f.key
        FROM (SELECT r.run_id,
                     (SELECT l.key FROM limits l
                      WHERE l.key = ANY($1::text[]) AND {COVERS} ORDER BY l.key LIMIT 1) AS key
              FROM runs r WHERE r.held AND r.state = 'QUEUED'
              ORDER BY r.priority DESC, r.submit_seq LIMIT $2) f
        WHERE u.run_id = f.run_id AND f.key IS NOT NULL AND u.held_by IS DISTINCT FROM f.key
        """,
        _full(usage),
        batch,
    )
    return len(items)


def _full(usage: dict[str, tuple[int, int]]) -> list[str]:
    return [key for key, (running, most) in usage.items() if running >= most]


class Admission:
    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def admit(self, batch: int = 1000) -> int:
        """One admission pass in a transaction of its own; how many runs were admitted."""
        async with self._connections.transaction() as connection:
            return await admit(connection, batch)
