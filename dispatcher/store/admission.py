"""The admission pass: held runs get their LaunchRun once every limit they fall under has room
(what a limit is and counts: ``limits.py``)."""

from __future__ import annotations

import uuid

import asyncpg

from schemas.topology import INSTRUCTIONS_EXCHANGE

from . import outbox, runs
from .connections import Connections
from .limits import COVERS, HOLDING

_ADMIT_LOCK = 0x68642D61646D  # "hd-adm": one admission pass at a time, across processes


async def admit(connection: asyncpg.Connection, batch: int = 1000) -> int:
    """One admission pass (in the caller's transaction): write the LaunchRun of every held
    run whose limits all have room, in priority order; returns how many were admitted."""
    await connection.execute("SELECT pg_advisory_xact_lock($1)", _ADMIT_LOCK)
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
    waiting = await connection.fetch(
        f"""
        SELECT r.run_id, r.held_by,
               array(SELECT l.key FROM limits l WHERE {COVERS} ORDER BY l.key) AS keys
        FROM runs r WHERE r.held AND r.state = 'QUEUED'
        ORDER BY r.priority DESC, r.submit_seq, r.created_at, r.run_id
        LIMIT $1 FOR UPDATE OF r SKIP LOCKED
        """,
        batch,
    )
    admitted: list[uuid.UUID] = []
    blocked: dict[uuid.UUID, str] = {}
    for run in waiting:
        full = [key for key in run["keys"] if usage[key][0] >= usage[key][1]]
        if full:
            if run["held_by"] != full[0]:
                blocked[run["run_id"]] = full[0]
            continue
        for key in run["keys"]:
            running, most = usage[key]
            usage[key] = (running + 1, most)
        admitted.append(run["run_id"])
    if blocked:
        await connection.execute(
            """
            UPDATE runs SET held_by = b.key
            FROM unnest($1::uuid[], $2::text[]) AS b(run_id, key) WHERE runs.run_id = b.run_id
            """,
            list(blocked),
            list(blocked.values()),
        )
    if not admitted:
        return 0
    rows = await connection.fetch(
        """
        UPDATE runs SET held = false, held_by = NULL, updated_at = now()
        WHERE run_id = ANY($1::uuid[]) RETURNING *
        """,
        admitted,
    )
    items = []
    for record in rows:
        run = runs.decoded(record)
        items.append(
            outbox.OutboxItem(runs.launch(run, run["attempt"]), INSTRUCTIONS_EXCHANGE, run["queue"])
        )
    await outbox.insert(connection, items)
    return len(items)


class Admission:
    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def admit(self, batch: int = 1000) -> int:
        """One admission pass in a transaction of its own; how many runs were admitted."""
        async with self._connections.transaction() as connection:
            return await admit(connection, batch)
