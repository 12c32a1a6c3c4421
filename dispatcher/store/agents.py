"""Agents: what their latest heartbeat said, and whether the monitor holds them ALIVE or LOST."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from schemas import AgentHeartbeat
from schemas.resources import Capacity

from .connections import Connections


@dataclass(frozen=True)
class AgentRow:
    agent_id: str
    status: str
    interval_s: float
    silent_s: float


async def record_heartbeat(connection: asyncpg.Connection, beat: AgentHeartbeat) -> None:
    """Record a heartbeat: ALIVE or DRAINING as it says (a LOST agent stays LOST until the
    monitor sees it back; a LEFT one that beats again is ALIVE)."""
    await connection.execute(
        """
        INSERT INTO agents (agent_id, queues, max_concurrent, in_flight, last_sequence,
                            interval_s, last_heartbeat_at, status, cpus, memory_mb, gpus)
        VALUES ($1, $2::jsonb, $3, $4::jsonb, $5, $6, now(),
                CASE WHEN $7 THEN 'DRAINING' ELSE 'ALIVE' END, $8, $9, $10)
        ON CONFLICT (agent_id) DO UPDATE SET
            queues = EXCLUDED.queues, max_concurrent = EXCLUDED.max_concurrent,
            in_flight = EXCLUDED.in_flight, last_sequence = EXCLUDED.last_sequence,
            interval_s = EXCLUDED.interval_s, last_heartbeat_at = now(),
            status = CASE WHEN agents.status = 'LOST' THEN 'LOST' ELSE EXCLUDED.status END,
            cpus = EXCLUDED.cpus, memory_mb = EXCLUDED.memory_mb, gpus = EXCLUDED.gpus
        """,
        beat.agent_id,
        json.dumps(list(beat.queues)),
        beat.max_concurrent,
        msgspec.json.encode(beat.in_flight).decode(),
        beat.sequence,
        beat.interval_s,
        beat.draining,
        beat.cpus,
        beat.memory_mb,
        beat.gpus,
    )


async def live_capacities(
    connection: asyncpg.Connection, queues: Collection[str]
) -> dict[str, dict[str, Capacity]]:
    """The capacity each live (ALIVE) agent of each of ``queues`` declared in its latest
    heartbeat: queue → agent id → capacity. A queue with no live agent is left out."""
    records = await connection.fetch(
        """
        SELECT q.queue, a.agent_id, a.cpus, a.memory_mb, a.gpus
        FROM agents a CROSS JOIN LATERAL jsonb_array_elements_text(a.queues) AS q(queue)
        WHERE a.status = 'ALIVE' AND q.queue = ANY($1::text[])
        ORDER BY q.queue, a.agent_id
        """,
        list(queues),
    )
    found: dict[str, dict[str, Capacity]] = {}
    for r in records:
        found.setdefault(r["queue"], {})[r["agent_id"]] = Capacity(
            cpus=r["cpus"], memory_mb=r["memory_mb"], gpus=r["gpus"]
        )
    return found


# The three changes of status below lock the agents' rows first, in one order (by id), so
# that two transactions changing many agents at once never wait for each other in a cycle.


async def mark_lost(
    connection: asyncpg.Connection, agent_ids: Collection[str]
) -> dict[str, datetime]:
    """ALIVE or DRAINING → LOST; for each agent that changed now, the time it did.

    An agent with no row yet that holds an active run (no heartbeat of its ever came
    through) is recorded first, so that it is declared lost like the others."""
    await connection.execute(
        """
        INSERT INTO agents (agent_id)
        SELECT DISTINCT agent_id FROM runs
        WHERE agent_id = ANY($1::text[]) AND state IN ('QUEUED', 'STARTING', 'STARTED', 'CANCELING')
        ORDER BY agent_id
        ON CONFLICT DO NOTHING
        """,
        list(agent_ids),
    )
    records = await connection.fetch(
        """
        UPDATE agents a SET status = 'LOST', lost_at = now()
        FROM (SELECT agent_id FROM agents
              WHERE agent_id = ANY($1::text[]) AND status IN ('ALIVE', 'DRAINING')
              ORDER BY agent_id FOR UPDATE) AS chosen
        WHERE a.agent_id = chosen.agent_id
        RETURNING a.agent_id, a.lost_at
        """,
        list(agent_ids),
    )
    return {r["agent_id"]: r["lost_at"] for r in records}


async def mark_left(connection: asyncpg.Connection, agent_ids: Collection[str]) -> list[str]:
    """DRAINING → LEFT (drained agents that stopped); the agents that changed now."""
    records = await connection.fetch(
        """
        UPDATE agents a SET status = 'LEFT'
        FROM (SELECT agent_id FROM agents
              WHERE agent_id = ANY($1::text[]) AND status = 'DRAINING'
              ORDER BY agent_id FOR UPDATE) AS chosen
        WHERE a.agent_id = chosen.agent_id
        RETURNING a.agent_id
        """,
        list(agent_ids),
    )
    return [r["agent_id"] for r in records]


async def mark_alive(
    connection: asyncpg.Connection, agent_ids: Collection[str]
) -> dict[str, datetime]:
    """LOST → ALIVE; for each agent that changed now, the time it had been declared lost."""
    records = await connection.fetch(
        """
        UPDATE agents a SET status = 'ALIVE'
        FROM (SELECT agent_id FROM agents
              WHERE agent_id = ANY($1::text[]) AND status = 'LOST'
              ORDER BY agent_id FOR UPDATE) AS chosen
        WHERE a.agent_id = chosen.agent_id
        RETURNING a.agent_id, a.lost_at
        """,
        list(agent_ids),
    )
    return {r["agent_id"]: r["lost_at"] for r in records}


class Agents:
    """Reading agents: for operators, and for the monitor's view."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def all(self) -> list[dict[str, Any]]:
        """Every agent the control plane has heard of, most recently heard first, with the
        capacity it declares (``cpus``, ``memory_mb``: None when not counted; ``gpus``)."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                """
                SELECT agent_id, status, queues, max_concurrent, cpus, memory_mb, gpus,
                       in_flight, last_sequence, first_seen_at, last_heartbeat_at, lost_at,
                       EXTRACT(EPOCH FROM now() - last_heartbeat_at)::float8 AS silent_s
                FROM agents ORDER BY last_heartbeat_at DESC
                """
            )
        return [
            {**dict(r), "queues": json.loads(r["queues"]), "in_flight": json.loads(r["in_flight"])}
            for r in records
        ]

    async def rows(self) -> list[AgentRow]:
        """Every agent's status, heartbeat interval and silence so far."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                """
                SELECT agent_id, status, interval_s,
                       EXTRACT(EPOCH FROM now() - last_heartbeat_at)::float8 AS silent_s
                FROM agents
                """
            )
        return [
            AgentRow(r["agent_id"], r["status"], r["interval_s"], r["silent_s"]) for r in records
        ]
