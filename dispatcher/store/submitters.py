"""Submitter tokens' limits, by broker user name, and the intake's screening of senders.

The tokens themselves (users and secrets) live on the broker; a token is a submitter for the
intake once it is registered here. Each change is audited in its own transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import msgspec

from schemas import SubmitRun

from .. import submitters as rules
from . import audit
from .connections import Connections
from .limits import IN_FORCE_JSON, Limit, in_force_from_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmitterRow:
    name: str
    limits: rules.Limits
    created_at: datetime
    created_by: str


def _limits(record: asyncpg.Record) -> rules.Limits:
    return rules.Limits(tuple(record["queues"]), tuple(record["locations"]))


async def registry(connection: asyncpg.Connection, names: Collection[str]) -> rules.Registry:
    """The registered submitters among ``names``, and whether any is registered at all."""
    return (await registry_and_limits(connection, names, with_limits=False))[0]


async def registry_and_limits(
    connection: asyncpg.Connection, names: Collection[str], with_limits: bool = True
) -> tuple[rules.Registry, list[Limit] | None]:
    """``registry``, and the limits in force (``limits.in_force``) in the same round trip."""
    # One round trip: a first row says whether any is registered, even when none is named.
    records = await connection.fetch(
        f"""
        SELECT s.name, s.queues, s.locations, a.in_use, a.in_force
        FROM (SELECT EXISTS (SELECT 1 FROM submitters) AS in_use,
                     {IN_FORCE_JSON if with_limits else "NULL::json"} AS in_force) AS a
        LEFT JOIN submitters AS s ON s.name = ANY($1::text[])
        """,
        sorted(set(names)),
    )
    in_use = bool(records[0]["in_use"])
    known = rules.Registry(
        in_use, {r["name"]: _limits(r) for r in records if r["name"] is not None}
    )
    in_force = records[0]["in_force"]
    return known, in_force_from_json(in_force) if in_force is not None else None


async def screen(
    connection: asyncpg.Connection,
    submissions: Sequence[SubmitRun],
    senders: Sequence[str | None],
    trusted: Collection[str],
) -> tuple[list[SubmitRun], list[tuple[SubmitRun, str]], list[Limit]]:
    """Split a batch by its senders (``dispatcher.submitters``): (allowed, [(refused, why)],
    and the limits in force, read in the same round trip for ``runs.create``).

    ``senders`` are the submissions' AMQP user_ids, in order, as the broker verified them."""
    known, in_force = await registry_and_limits(connection, [s for s in senders if s is not None])
    assert in_force is not None
    queues: dict[str, str] = {}
    if known.limits:
        # A job run goes to its location's queue: that is the queue its limits apply to.
        located = sorted({s.location for s in submissions if s.location})
        records = await connection.fetch(
            "SELECT name, queue FROM code_locations WHERE name = ANY($1::text[])", located
        )
        queues = {r["name"]: r["queue"] for r in records}
    allowed, refused = [], []
    for submission, sender in zip(submissions, senders, strict=True):
        why = rules.sender_problem(sender, trusted, known)
        limits = known.limits.get(sender) if sender is not None else None
        if why is None and sender is not None and limits is not None:
            queue = queues.get(submission.location) if submission.location else submission.queue
            why = rules.limits_problem(sender, limits, submission, queue)
        if why is None:
            why = rules.submitted_by_problem(submission, sender, trusted)
        if why is None:
            if submission.submitted_by is None and sender is not None:
                # Who submitted it, as the broker verified: the token or identity.
                submission = msgspec.structs.replace(submission, submitted_by=sender)
            allowed.append(submission)
        else:
            log.warning("submission of run %s refused: %s", submission.run_id, why)
            refused.append((submission, why))
    return allowed, refused, in_force


class Submitters:
    """The registry of submitter tokens."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def register(self, actor: str, name: str, limits: rules.Limits) -> None:
        """Register (or re-limit) a token, audited as ``submitter.add``."""
        async with self._connections.transaction() as connection:
            await connection.execute(
                """
                INSERT INTO submitters (name, queues, locations, created_by)
                VALUES ($1, $2::text[], $3::text[], $4)
                ON CONFLICT (name) DO UPDATE SET queues = EXCLUDED.queues,
                    locations = EXCLUDED.locations, created_at = now(),
                    created_by = EXCLUDED.created_by
                """,
                name,
                list(limits.queues),
                list(limits.locations),
                actor[:200],
            )
            details = {"queues": list(limits.queues), "locations": list(limits.locations)}
            await audit.record(connection, actor, "submitter.add", name, details)

    async def remove(self, actor: str, name: str, on_broker: bool) -> bool:
        """Forget a token; True when it was registered. Audited as ``submitter.revoke`` when
        it was registered or its broker user was deleted (``on_broker``)."""
        async with self._connections.transaction() as connection:
            found = await connection.fetchval(
                "DELETE FROM submitters WHERE name = $1 RETURNING name", name
            )
            if found is None and not on_broker:
                return False
            details = {"registered": found is not None, "broker_user_deleted": on_broker}
            await audit.record(connection, actor, "submitter.revoke", name, details)
            return found is not None

    async def get(self, name: str) -> rules.Limits | None:
        async with self._connections.connection() as connection:
            record = await connection.fetchrow(
                "SELECT queues, locations FROM submitters WHERE name = $1", name
            )
        return None if record is None else _limits(record)

    async def all(self) -> list[SubmitterRow]:
        async with self._connections.connection() as connection:
            records = await connection.fetch("SELECT * FROM submitters ORDER BY name")
        return [
            SubmitterRow(r["name"], _limits(r), r["created_at"], r["created_by"]) for r in records
        ]
