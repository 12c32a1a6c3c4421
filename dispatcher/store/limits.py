"""Concurrency limits: runs held QUEUED (no LaunchRun written) until their limits have room.

A limit caps the runs that hold a slot: admitted (not held) and not ended. Its key names what
it covers: ``global``, ``queue:NAME``, ``location:NAME`` or ``tag:KEY=VALUE``. A run under no
limit is written with its LaunchRun at intake, as ever; a run under one or more is inserted
held, and the admitter (``admit``) writes its LaunchRun in the transaction that takes its
slots. Admitters serialize on one advisory lock and count slots from the runs table itself,
so limits hold across restarts and with any number of control-plane processes. The admitter
takes held runs highest priority first, oldest first within a priority; a run blocked by a
full limit does not hold back a run that only falls under limits with room.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import asyncpg

from schemas.topology import INSTRUCTIONS_EXCHANGE

from ..limits import Limit, holds, parse
from . import audit, outbox, runs
from .connections import Connections

__all__ = ["ADMIT_CHANNEL", "Limit", "LimitUsage", "Limits", "admit", "holds", "in_force"]

log = logging.getLogger(__name__)

#: NOTIFY channel that wakes the admitter: a held run was created, a slot may have freed, a
#: limit changed.
ADMIT_CHANNEL = "hd_admit"
_ADMIT_LOCK = 0x68642D61646D  # "hd-adm": one admission pass at a time, across processes
#: Whether run ``r`` falls under limit ``l``, in SQL (one place, read by every query here).
_COVERS = """(l.scope = 'global'
              OR (l.scope = 'queue' AND r.queue = l.name)
              OR (l.scope = 'location' AND r.location = l.name)
              OR (l.scope = 'tag' AND r.tags ->> l.name = l.value))"""
#: A run that holds a slot (matches the partial index ``runs_holding``).
_HOLDING = "NOT r.held AND r.state NOT IN ('SUCCESS', 'FAILURE', 'CANCELED')"


async def in_force(connection: asyncpg.Connection) -> list[Limit]:
    records = await connection.fetch(
        "SELECT key, scope, name, value, max_running FROM limits ORDER BY key"
    )
    return [Limit(**dict(r)) for r in records]


async def wake_admitter(connection: asyncpg.Connection) -> None:
    """Wake the admitter when this transaction commits."""
    await connection.execute(f"NOTIFY {ADMIT_CHANNEL}")


async def admit(connection: asyncpg.Connection, batch: int = 1000) -> int:
    """One admission pass (in the caller's transaction): write the LaunchRun of every held
    run whose limits all have room, in priority order; returns how many were admitted."""
    await connection.execute("SELECT pg_advisory_xact_lock($1)", _ADMIT_LOCK)
    usage = {
        r["key"]: (int(r["running"]), int(r["max_running"]))
        for r in await connection.fetch(
            f"""
            SELECT l.key, l.max_running,
                   (SELECT count(*) FROM runs r WHERE {_HOLDING} AND {_COVERS}) AS running
            FROM limits l
            """
        )
    }
    waiting = await connection.fetch(
        f"""
        SELECT r.run_id, r.held_by,
               array(SELECT l.key FROM limits l WHERE {_COVERS} ORDER BY l.key) AS keys
        FROM runs r WHERE r.held AND r.state = 'QUEUED'
        ORDER BY r.priority DESC, r.created_at, r.run_id
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


@dataclass(frozen=True)
class LimitUsage:
    limit: Limit
    running: int
    waiting: int


class Limits:
    """Limits as operators set and read them."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def set(self, key: str, max_running: int, actor: str) -> Limit:
        limit = parse(key, max_running)
        async with self._connections.transaction() as connection:
            await audit.record(
                connection, actor, "limit.set", limit.key, {"max_running": max_running}
            )
            await connection.execute(
                """
                INSERT INTO limits (key, scope, name, value, max_running)
                VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (key) DO UPDATE
                SET max_running = excluded.max_running, updated_at = now()
                """,
                limit.key,
                limit.scope,
                limit.name,
                limit.value,
                limit.max_running,
            )
            await wake_admitter(connection)
        return limit

    async def remove(self, key: str, actor: str) -> bool:
        """Remove a limit (the runs it held go on); False if there was none."""
        limit = parse(key)
        async with self._connections.transaction() as connection:
            status = await connection.execute("DELETE FROM limits WHERE key = $1", limit.key)
            if status.endswith(" 1"):
                await audit.record(connection, actor, "limit.remove", limit.key)
            await wake_admitter(connection)
        return bool(status.endswith(" 1"))

    async def usage(self) -> list[LimitUsage]:
        """Every limit with the runs holding its slots and the runs it holds back."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                f"""
                SELECT l.key, l.scope, l.name, l.value, l.max_running,
                       (SELECT count(*) FROM runs r WHERE {_HOLDING} AND {_COVERS}) AS running,
                       (SELECT count(*) FROM runs r
                        WHERE r.held AND r.state = 'QUEUED' AND r.held_by = l.key) AS waiting
                FROM limits l ORDER BY l.key
                """
            )
        return [
            LimitUsage(
                Limit(r["key"], r["scope"], r["name"], r["value"], r["max_running"]),
                int(r["running"]),
                int(r["waiting"]),
            )
            for r in records
        ]

    async def admit(self, batch: int = 1000) -> int:
        async with self._connections.transaction() as connection:
            return await admit(connection, batch)

    async def waiting_reason(self, run_id: uuid.UUID) -> str | None:
        """Why a held run waits ("limit tag:team=ml (2 of 2 running)"), or None."""
        async with self._connections.connection() as connection:
            record = await connection.fetchrow(
                f"""
                SELECT l.key, l.max_running,
                       (SELECT count(*) FROM runs r WHERE {_HOLDING} AND {_COVERS}) AS running
                FROM runs h JOIN limits l ON l.key = h.held_by
                WHERE h.run_id = $1 AND h.held AND h.state = 'QUEUED'
                """,
                run_id,
            )
        if record is None:
            return None
        return waiting_words(record["key"], int(record["running"]), int(record["max_running"]))


def waiting_words(key: str, running: int, max_running: int) -> str:
    return f"limit {key} ({running} of {max_running} running)"
