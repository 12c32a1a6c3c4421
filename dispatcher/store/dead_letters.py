"""Dead letters seen: counted by source queue, alerted on once per queue and hour, and a dead
LaunchRun fails its attempt if that attempt is still waiting to launch."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ..dead_letters import DeadLetterSeen, launch_failure
from . import alerts, events
from .connections import Connections


async def _known(
    connection: asyncpg.Connection, letters: Sequence[DeadLetterSeen]
) -> Sequence[DeadLetterSeen]:
    """``letters``, each from a queue of an agent the store knows (its control queue, or an
    instruction queue it consumes) or from ``other``. The source is the sender's header, and
    any agent may publish dead letters: a name of its own invention would be a counter, a
    metric label and an alert an hour, each, without end."""
    named = {
        letter.source_queue
        for letter in letters
        if letter.source_queue.startswith(("hd.control.", "hd.instructions."))
    }
    if not named:
        return letters
    known = set(
        await connection.fetchval(
            """
            SELECT coalesce(array_agg(name), '{}') FROM unnest($1::text[]) AS name
            WHERE EXISTS (SELECT 1 FROM agents WHERE 'hd.control.' || agent_id = name)
               OR EXISTS (SELECT 1 FROM agents, jsonb_array_elements_text(queues) AS queue
                          WHERE 'hd.instructions.' || queue = name)
            """,
            sorted(named),
        )
    )
    return [
        letter
        if letter.source_queue not in named or letter.source_queue in known
        else dataclasses.replace(letter, source_queue="other")
        for letter in letters
    ]


async def _count(connection: asyncpg.Connection, letters: Sequence[DeadLetterSeen]) -> None:
    counts = Counter(letter.source_queue for letter in letters)
    last = {letter.source_queue: letter.reason for letter in letters}
    hour = datetime.now(UTC).strftime("%Y-%m-%dT%H")
    for source, count in counts.items():
        await connection.execute(
            """
            INSERT INTO dead_letter_counts (source_queue, total, last_reason, last_at)
            VALUES ($1, $2, $3, now())
            ON CONFLICT (source_queue) DO UPDATE SET
                total = dead_letter_counts.total + EXCLUDED.total,
                last_reason = EXCLUDED.last_reason, last_at = now()
            """,
            source,
            count,
            last[source],
        )
        await alerts.raise_alert(
            connection,
            f"dead-letters:{source}:{hour}",
            alerts.DEAD_LETTERS,
            f"queue {source}",
            f"messages from {source} were dead-lettered; the latest because: {last[source]}",
            {"source_queue": source, "reason": last[source]},
        )


#: How many of the latest dead letters are kept for the HTTP API, and how much of each body.
DEAD_LETTERS_KEPT = 1000
BODY_KEPT = 4096


async def _keep(connection: asyncpg.Connection, letters: Sequence[DeadLetterSeen]) -> None:
    await connection.execute(
        """
        INSERT INTO dead_letters_seen (source_queue, reason, message_id, body)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])
        """,
        [letter.source_queue for letter in letters],
        [letter.reason for letter in letters],
        [letter.message_id for letter in letters],
        [letter.body[:BODY_KEPT] for letter in letters],
    )
    await connection.execute(
        "DELETE FROM dead_letters_seen WHERE seq <= (SELECT max(seq) FROM dead_letters_seen) - $1",
        DEAD_LETTERS_KEPT,
    )


@dataclass(frozen=True)
class DeadLetterRow:
    seen_at: datetime
    source_queue: str
    reason: str
    message_id: str | None
    body: bytes


class DeadLetters:
    def __init__(self, connections: Connections, retry_backoff_s: float) -> None:
        self._connections = connections
        self._retry_backoff_s = retry_backoff_s

    async def record(self, letters: Sequence[DeadLetterSeen]) -> list[DeadLetterSeen]:
        """Count, keep (the latest, for the HTTP API) and alert on dead letters; a dead LaunchRun
        fails its attempt if still QUEUED. Returns them as recorded: an agent's queue that no
        agent has is ``other`` (see ``_known``)."""
        async with self._connections.transaction() as connection:
            letters = await _known(connection, letters)
            await _count(connection, letters)
            await _keep(connection, letters)
            for letter in letters:
                failed = launch_failure(letter)
                # Only an attempt still waiting to launch: a dead LaunchRun never started a
                # container, and anyone who can publish a dead letter must not fail a live run.
                if failed is not None and await connection.fetchval(
                    "SELECT 1 FROM runs WHERE run_id = $1 AND attempt = $2 AND state = 'QUEUED'",
                    failed.run_id,
                    failed.attempt,
                ):
                    await events.apply(connection, failed, self._retry_backoff_s)
        return list(letters)

    async def latest(self, limit: int) -> list[DeadLetterRow]:
        """The latest ``limit`` dead letters seen, oldest first."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                """
                SELECT seen_at, source_queue, reason, message_id, body FROM (
                    SELECT * FROM dead_letters_seen ORDER BY seq DESC LIMIT $1
                ) latest ORDER BY seq
                """,
                limit,
            )
        return [DeadLetterRow(**dict(r)) for r in records]

    async def counts(self) -> list[dict[str, Any]]:
        """Dead letters seen so far, by source queue."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                "SELECT source_queue, total, last_reason, last_at FROM dead_letter_counts"
                " ORDER BY 1"
            )
        return [dict(r) for r in records]
