"""Alert deliveries on a real PostgreSQL: a webhook that keeps failing is tried again at the
longest backoff for as long as it fails, and never takes the monitor's delivery loop down."""

from __future__ import annotations

from dispatcher.store import Database
from dispatcher.store.alerts import raise_alert

URL = "http://hooks.invalid/alerts"


async def test_a_delivery_failed_for_days_is_tried_again_at_the_longest_backoff(
    store: Database,
) -> None:
    async with store.connections.transaction() as connection:
        assert await raise_alert(connection, "k-1", "run_failed", "run x", "run x failed", {})
    assert await store.alerts.log_new([URL]) == 1
    async with store.connections.connection() as connection:
        # About a week of a dead webhook at the longest backoff: 2.0**2000 is no float.
        await connection.execute("UPDATE alert_deliveries SET attempts = 2000")
    posted: list[str] = []

    async def failing(url: str, body: bytes) -> str | None:
        posted.append(url)
        return "connection refused"

    assert await store.alerts.deliver_due(failing, max_backoff_s=300.0) == 1
    assert posted == [URL]
    async with store.connections.connection() as connection:
        row = await connection.fetchrow(
            "SELECT attempts, last_error, "
            "extract(epoch FROM next_attempt_at - now())::float AS due_in "
            "FROM alert_deliveries"
        )
    assert (row["attempts"], row["last_error"]) == (2001, "connection refused")
    assert 290 < row["due_in"] <= 300
    # Not due again yet: nothing is posted.
    assert await store.alerts.deliver_due(failing, max_backoff_s=300.0) == 0
    assert posted == [URL]
