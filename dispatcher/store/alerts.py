"""Alerts: one row per incident, and one delivery row per (alert, webhook URL).

An alert is raised in the transaction of the state change it reports, under a dedupe key that
names the incident, so that it exists exactly once however many processes, restarts or
redeliveries see the change.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from .connections import Connections

log = logging.getLogger(__name__)

#: Kinds of alert.
RUN_FAILED = "run_failed"
AGENT_DOWN = "agent_down"
AGENT_BACK = "agent_back"
RUN_LONG = "run_running_long"
QUEUE_UNSERVED = "queue_unserved"
DEAD_LETTERS = "messages_dead_lettered"

#: Posts one alert's JSON body to one URL; returns None when delivered, else the error.
Post = Callable[[str, bytes], Awaitable[str | None]]


async def raise_alert(
    connection: asyncpg.Connection,
    dedupe_key: str,
    kind: str,
    subject: str,
    message: str,
    payload: dict[str, Any],
) -> bool:
    """Record an alert unless its incident has one already; True when recorded now."""
    alert_id = await connection.fetchval(
        """
        INSERT INTO alerts (dedupe_key, kind, subject, message, payload)
        VALUES ($1, $2, $3, $4, $5::jsonb)
        ON CONFLICT (dedupe_key) DO NOTHING
        RETURNING id
        """,
        dedupe_key,
        kind,
        subject,
        message,
        json.dumps(payload),
    )
    return alert_id is not None


def webhook_site(url: str) -> str:
    """A webhook URL as it is shown where the URL itself must not be (a log line, a token
    that is no admin's): its scheme, host and port. A Slack-style hook's path is its secret,
    and anyone who has it may post."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "(a webhook)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}/…"


class Alerts:
    """Listing alerts, and their delivery: to the log once, to each webhook until it succeeds."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """Alerts, newest first, each with the delivery state of every webhook."""
        async with self._connections.connection() as connection:
            records = await connection.fetch(
                """
                SELECT a.id, a.dedupe_key, a.kind, a.message, a.created_at, a.logged_at,
                       COALESCE(json_agg(json_build_object(
                           'url', d.url, 'attempts', d.attempts,
                           'delivered_at', d.delivered_at, 'last_error', d.last_error))
                         FILTER (WHERE d.url IS NOT NULL), '[]') AS deliveries
                FROM alerts a LEFT JOIN alert_deliveries d ON d.alert_id = a.id
                GROUP BY a.id ORDER BY a.id DESC LIMIT $1
                """,
                limit,
            )
        return [{**dict(r), "deliveries": json.loads(r["deliveries"])} for r in records]

    async def log_new(self, urls: Sequence[str]) -> int:
        """Log alerts not logged yet, and give each a delivery row per webhook URL."""
        async with self._connections.transaction() as connection:
            fresh = await connection.fetch(
                """
                UPDATE alerts SET logged_at = now() WHERE logged_at IS NULL
                RETURNING id, kind, subject, message
                """
            )
            for alert in fresh:
                log.warning("ALERT %s: %s", alert["kind"], alert["message"])
                for url in urls:
                    await connection.execute(
                        "INSERT INTO alert_deliveries (alert_id, url) VALUES ($1, $2) "
                        "ON CONFLICT DO NOTHING",
                        alert["id"],
                        url,
                    )
        return len(fresh)

    async def deliver_due(self, post: Post, max_backoff_s: float, limit: int = 50) -> int:
        """Post every delivery that is due (rows locked meanwhile); returns how many were tried.

        A failed delivery is tried again after an exponential backoff up to ``max_backoff_s``.
        """
        async with self._connections.transaction() as connection:
            due = await connection.fetch(
                """
                SELECT d.alert_id, d.url, d.attempts, a.dedupe_key, a.kind, a.subject,
                       a.message, a.payload, a.created_at
                FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id
                WHERE d.delivered_at IS NULL AND d.next_attempt_at <= now()
                ORDER BY d.alert_id LIMIT $1
                FOR UPDATE OF d SKIP LOCKED
                """,
                limit,
            )
            for row in due:
                body = json.dumps(
                    {
                        "id": row["alert_id"],
                        "incident": row["dedupe_key"],
                        "kind": row["kind"],
                        "subject": row["subject"],
                        "message": row["message"],
                        "details": json.loads(row["payload"]),
                        "created_at": row["created_at"].isoformat(),
                    }
                ).encode()
                error = await post(row["url"], body)
                attempts = row["attempts"] + 1
                if error is None:
                    await connection.execute(
                        "UPDATE alert_deliveries SET delivered_at = now(), attempts = $3, "
                        "last_error = NULL WHERE alert_id = $1 AND url = $2",
                        row["alert_id"],
                        row["url"],
                        attempts,
                    )
                    continue
                backoff = retry_in(attempts, max_backoff_s)
                log.warning(
                    "alert %d to %s failed (%s); next try in %.0f s",
                    row["alert_id"],
                    webhook_site(row["url"]),
                    error,
                    backoff,
                )
                await connection.execute(
                    "UPDATE alert_deliveries SET attempts = $3, last_error = $4, "
                    "next_attempt_at = now() + $5 * interval '1 second' "
                    "WHERE alert_id = $1 AND url = $2",
                    row["alert_id"],
                    row["url"],
                    attempts,
                    error[:1000],
                    backoff,
                )
        return len(due)


def retry_in(attempts: int, max_backoff_s: float) -> float:
    """Seconds before a delivery failed ``attempts`` times is tried again: doubling, up to
    ``max_backoff_s``. The exponent stops growing long before the cap (2.0**1024 is no
    float: a webhook failing for days used to end the monitor at every start)."""
    return min(max_backoff_s, 2.0 ** min(attempts, 32))
