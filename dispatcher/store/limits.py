"""Concurrency limits: runs held QUEUED (no LaunchRun written) until their limits have room.

A limit caps the runs that hold a slot: admitted (not held) and not ended. Its key names what
it covers: ``global``, ``queue:NAME``, ``location:NAME`` or ``tag:KEY=VALUE``. A run under no
limit is written with its LaunchRun at intake, as ever; a run under one or more is inserted
held, and the admitter (``admission.admit``) writes its LaunchRun in the transaction that takes its
slots. Admitters serialize on one advisory lock and count slots from the runs table itself,
so limits hold across restarts and with any number of control-plane processes. The admitter
takes held runs highest priority first, oldest first within a priority; a run blocked by a
full limit does not hold back a run that only falls under limits with room.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass

import asyncpg

from ..limits import Limit, holds, parse
from . import audit
from .connections import Connections

__all__ = [
    "ADMIT_CHANNEL",
    "ADMIT_LOCK",
    "COVERS",
    "HOLDING",
    "Limit",
    "LimitUsage",
    "Limits",
    "holds",
    "in_force",
    "in_force_from_json",
]

log = logging.getLogger(__name__)

#: NOTIFY channel that wakes the admitter: a held run was created, a slot may have freed, a
#: limit changed.
ADMIT_CHANNEL = "hd_admit"
#: One admission pass, or one change of the limits, at a time, across processes.
ADMIT_LOCK = 0x68642D61646D  # "hd-adm"
#: Whether run ``r`` falls under limit ``l``, in SQL (one place, read by every query here).
COVERS = """(l.scope = 'global'
              OR (l.scope = 'queue' AND r.queue = l.name)
              OR (l.scope = 'location' AND r.location = l.name)
              OR (l.scope = 'tag' AND r.tags ->> l.name = l.value))"""
#: A run that holds a slot (matches the partial index ``runs_holding``).
HOLDING = "NOT r.held AND r.state NOT IN ('SUCCESS', 'FAILURE', 'CANCELED')"


#: The limits in force as one JSON array (``in_force_from_json``), for a query that reads them
#: along with something else: one round trip for both.
IN_FORCE_JSON = """(SELECT coalesce(json_agg(l ORDER BY l.key), '[]')
                     FROM (SELECT key, scope, name, value, max_running FROM limits) AS l)"""


def in_force_from_json(raw: str) -> list[Limit]:
    return [Limit(**item) for item in json.loads(raw)]


async def in_force(connection: asyncpg.Connection) -> list[Limit]:
    records = await connection.fetch(
        "SELECT key, scope, name, value, max_running FROM limits ORDER BY key"
    )
    return [Limit(**dict(r)) for r in records]


async def wake_admitter(connection: asyncpg.Connection) -> None:
    """Wake the admitter when this transaction commits (at once, outside a transaction)."""
    await connection.execute(f"NOTIFY {ADMIT_CHANNEL}")


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
            await connection.execute("SELECT pg_advisory_xact_lock($1)", ADMIT_LOCK)
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
        """Remove a limit (the runs it held go on); False if there was none.

        By its key as stored, whatever it names: a limit set before names were checked can
        still be removed."""
        key = key.strip()
        async with self._connections.transaction() as connection:
            await connection.execute("SELECT pg_advisory_xact_lock($1)", ADMIT_LOCK)
            status = await connection.execute("DELETE FROM limits WHERE key = $1", key)
            if status.endswith(" 1"):
                await audit.record(connection, actor, "limit.remove", key)
            await wake_admitter(connection)
        return bool(status.endswith(" 1"))

    async def usage(self) -> list[LimitUsage]:
        """Every limit with the runs holding its slots and the runs it holds back."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                f"""
                SELECT l.key, l.scope, l.name, l.value, l.max_running,
                       (SELECT count(*) FROM runs r WHERE {HOLDING} AND {COVERS}) AS running,
                       (SELECT count(*) FROM runs r
                        WHERE r.held AND r.state = 'QUEUED' AND {COVERS}) AS waiting
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

    async def waiting_reason(self, run_id: uuid.UUID) -> str | None:
        """Why a held run waits ("limit tag:team=ml (2 of 2 running)"), or None."""
        async with self._connections.connection() as connection:
            record = await connection.fetchrow(
                f"""
                SELECT l.key, l.max_running,
                       (SELECT count(*) FROM runs r WHERE {HOLDING} AND {COVERS}) AS running
                FROM runs h JOIN limits l ON l.key = h.held_by
                WHERE h.run_id = $1 AND h.held AND h.state = 'QUEUED'
                """,
                run_id,
            )
        if record is None:
            return None
        return f"limit {record['key']} ({record['running']} of {record['max_running']} running)"
