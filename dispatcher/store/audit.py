"""The audit log: who did what to the registry and to identities, and when.

An action on the database is recorded in its own transaction; an action on the broker (an
agent identity) is recorded once the broker has done it.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from .connections import Connections


async def record(
    connection: asyncpg.Connection,
    actor: str,
    action: str,
    subject: str,
    details: dict[str, Any] | None = None,
) -> None:
    await connection.execute(
        "INSERT INTO audit_log (actor, action, subject, details) VALUES ($1, $2, $3, $4::jsonb)",
        actor[:200],
        action,
        subject[:200],
        json.dumps(details or {}),
    )


class Audit:
    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def record(
        self, actor: str, action: str, subject: str, details: dict[str, Any] | None = None
    ) -> None:
        async with self._connections.transaction() as connection:
            await record(connection, actor, action, subject, details)

    async def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """Entries, newest first."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                "SELECT id, at, actor, action, subject, details FROM audit_log"
                " ORDER BY id DESC LIMIT $1",
                limit,
            )
        return [{**dict(r), "details": json.loads(r["details"])} for r in records]
