"""Alerts: one row per incident in PostgreSQL, delivered to the log and to webhooks.

An alert is raised in the same transaction as the state change it reports, under a dedupe
key that names the incident, so that it exists exactly once however many processes, restarts
or redeliveries see the change. Delivery is an outbox of its own: each (alert, webhook URL) is
POSTed until it succeeds, with backoff, and its status is recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

#: Kinds of alert.
RUN_FAILED = "run_failed"
AGENT_DOWN = "agent_down"
AGENT_BACK = "agent_back"
RUN_LONG = "run_running_long"


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


@dataclass(frozen=True)
class Delivery:
    alert_id: int
    url: str
    attempts: int
    body: bytes


class AlertDeliverer:
    """Logs new alerts and POSTs them as JSON to every webhook URL until each succeeds."""

    def __init__(
        self,
        connection: Callable[[], AbstractAsyncContextManager[asyncpg.Connection]],
        webhook_urls: Sequence[str],
        timeout_s: float = 5.0,
        max_backoff_s: float = 300.0,
    ) -> None:
        # The store's connections: a database outage surfaces as StoreUnavailable.
        self._connection = connection
        self._urls = list(webhook_urls)
        self._timeout_s = timeout_s
        self._max_backoff_s = max_backoff_s

    async def deliver_due(self) -> int:
        """One pass: log new alerts, then try every delivery that is due; returns how many."""
        async with self._connection() as connection, connection.transaction():
            fresh = await connection.fetch(
                """
                UPDATE alerts SET logged_at = now() WHERE logged_at IS NULL
                RETURNING id, kind, subject, message
                """
            )
            for alert in fresh:
                log.warning("ALERT %s: %s", alert["kind"], alert["message"])
                for url in self._urls:
                    await connection.execute(
                        "INSERT INTO alert_deliveries (alert_id, url) VALUES ($1, $2) "
                        "ON CONFLICT DO NOTHING",
                        alert["id"],
                        url,
                    )
        async with self._connection() as connection, connection.transaction():
            due = await connection.fetch(
                """
                SELECT d.alert_id, d.url, d.attempts, a.dedupe_key, a.kind, a.subject,
                       a.message, a.payload, a.created_at
                FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id
                WHERE d.delivered_at IS NULL AND d.next_attempt_at <= now()
                ORDER BY d.alert_id LIMIT 50
                FOR UPDATE OF d SKIP LOCKED
                """
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
                error = await asyncio.to_thread(self._post, row["url"], body)
                attempts = row["attempts"] + 1
                if error is None:
                    await connection.execute(
                        "UPDATE alert_deliveries SET delivered_at = now(), attempts = $3, "
                        "last_error = NULL WHERE alert_id = $1 AND url = $2",
                        row["alert_id"],
                        row["url"],
                        attempts,
                    )
                else:
                    backoff = min(self._max_backoff_s, 2.0**attempts)
                    log.warning(
                        "alert %d to %s failed (%s); next try in %.0f s",
                        row["alert_id"],
                        row["url"],
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

    def _post(self, url: str, body: bytes) -> str | None:
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            return repr(exc)
