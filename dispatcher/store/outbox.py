"""The outbox: messages written in the transaction of the change they announce, published after.

A NOTIFY on ``OUTBOX_CHANNEL`` at commit (a trigger's, for rows due) wakes the relay; it claims
unsent, due rows (``FOR UPDATE SKIP LOCKED``), publishes them with confirms and marks them sent
in the same transaction. Rows leased to a relay of the writer's own process (``LEASE_S``) are
not due until the lease is over: that relay publishes them and settles them (``handed_back``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from schemas import Message, RunAccepted, RunEnded, RunRejected, RunRetrying, encode, kind_of
from schemas.topology import CONTROL_SOURCE, STATUS_EXCHANGE, event_routing_key

from .connections import Connections

log = logging.getLogger(__name__)

#: NOTIFY channel that wakes the outbox relay.
OUTBOX_CHANNEL = "hd_outbox"

#: How long rows handed to a relay in the writer's process (``OutboxRelay.hand_off``) are
#: left to it: no relay claims them before (their ``not_before``). A process that dies
#: before publishing them leaves them to any relay after that.
LEASE_S = 10.0


@dataclass(frozen=True)
class OutboxItem:
    """A message to publish once the transaction commits, after ``delay_s`` if given."""

    message: Message
    exchange: str
    routing_key: str
    delay_s: float = 0.0


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


def answer(message: RunAccepted | RunRejected | RunEnded | RunRetrying) -> OutboxItem:
    """An announcement of the control plane's to the run's followers, through the outbox."""
    return OutboxItem(message, STATUS_EXCHANGE, event_routing_key(message, CONTROL_SOURCE))


def rows_sql(first: int, only: str = "") -> str:
    """An INSERT of the rows ``arrays`` binds as parameters ``$first`` to ``$first + 7``,
    in their order; ``only`` joins them to a relation of run ids (a CTE) that they must be
    in. A row whose message id exists already is skipped (idempotent). The relay is woken at
    commit by a trigger when a row is due (migrations 18 and 20)."""
    p = [f"${first + i}" for i in range(8)]
    join = f"JOIN {only} AS only_runs ON only_runs.run_id = o.run_id" if only else ""
    return f"""
        INSERT INTO outbox (message_id, run_id, attempt, exchange, routing_key, kind, payload,
                            not_before)
        SELECT o.message_id, o.run_id, o.attempt, o.exchange, o.routing_key, o.kind, o.payload,
               CASE WHEN o.delay > 0 THEN now() + o.delay * interval '1 second' END
        FROM unnest({p[0]}::uuid[], {p[1]}::uuid[], {p[2]}::int[], {p[3]}::text[],
                    {p[4]}::text[], {p[5]}::text[], {p[6]}::bytea[], {p[7]}::float8[])
             WITH ORDINALITY
             AS o(message_id, run_id, attempt, exchange, routing_key, kind, payload, delay, ord)
        {join}
        ORDER BY o.ord
        ON CONFLICT (message_id) DO NOTHING
        """


def arrays(items: Sequence[OutboxItem]) -> list[list[Any]]:
    """The parameters of ``rows_sql`` for ``items``."""
    return [
        [i.message.message_id for i in items],
        [getattr(i.message, "run_id", None) for i in items],
        [getattr(i.message, "attempt", 0) for i in items],
        [i.exchange for i in items],
        [i.routing_key for i in items],
        [kind_of(i.message) for i in items],
        [encode(i.message) for i in items],
        [i.delay_s for i in items],
    ]


async def insert(connection: asyncpg.Connection, items: Sequence[OutboxItem]) -> int:
    """Write outbox rows; a row whose message id exists already is skipped (idempotent).

    Returns how many rows were written.
    """
    if not items:
        return 0
    status = await connection.execute(rows_sql(1), *arrays(items))
    return int(status.split()[-1])


async def claim_unsent(connection: asyncpg.Connection, limit: int) -> list[OutboxRow]:
    """Lock up to ``limit`` due, unsent rows, oldest first (another relay takes others)."""
    records = await connection.fetch(
        """
        SELECT id, exchange, routing_key, kind, message_id, payload, run_id, attempt
        FROM outbox
        WHERE sent_at IS NULL AND (not_before IS NULL OR not_before <= now())
        ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
        """,
        limit,
    )
    return [
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


async def mark_sent(connection: asyncpg.Connection, ids: Sequence[int]) -> None:
    await connection.execute("UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])", ids)


async def handed_back(
    connection: asyncpg.Connection, sent: Sequence[uuid.UUID], back: Sequence[uuid.UUID]
) -> None:
    """Settle leased rows by message id: those ``sent`` are marked sent; those handed
    ``back`` are due at once, for the relay's round to take (and to set aside, when the
    broker refuses them), and the relay is woken. A row a relay's round has taken meanwhile
    (its lease ran out) is left to it, never waited for."""
    taken = "SELECT id FROM outbox WHERE message_id = ANY($1::uuid[]) AND sent_at IS NULL"
    if sent:
        await connection.execute(
            f"UPDATE outbox SET sent_at = now() WHERE id IN ({taken} FOR UPDATE SKIP LOCKED)",
            sent,
        )
    if back:
        await connection.execute(
            f"UPDATE outbox SET not_before = NULL WHERE id IN ({taken} FOR UPDATE SKIP LOCKED)",
            back,
        )
        await connection.execute(f"NOTIFY {OUTBOX_CHANNEL}")


async def set_aside(connection: asyncpg.Connection, row: OutboxRow, error: str) -> None:
    """A row the broker refuses is marked with the error, never to block the rows behind it."""
    await connection.execute(
        "UPDATE outbox SET sent_at = now(), error = $2 WHERE id = $1", row.id, error[:2000]
    )
    log.error("outbox row %d (%s) set aside: %s", row.id, row.kind, error)


class Outbox:
    """What the relay and operators read of the outbox."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def count_unsent(self, kind: str | None = None) -> int:
        """Outbox rows not yet published (of one message kind, if given)."""
        async with self._connections.connection() as connection:
            return int(
                await connection.fetchval(
                    "SELECT count(*) FROM outbox WHERE sent_at IS NULL"
                    " AND ($1::text IS NULL OR kind = $1)",
                    kind,
                )
            )
