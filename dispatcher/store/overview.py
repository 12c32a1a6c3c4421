"""What the overview page shows: runs per state over the last hours, failure reasons, and
launch latency percentiles, all computed from the runs and their stored events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .connections import Connections


class Overview:
    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def recent(self, hours: float, buckets: int = 24) -> dict[str, Any]:
        async with self._connections.connection() as connection:
            now: datetime = await connection.fetchval("SELECT now()")
            rows = await connection.fetch(
                """
                SELECT width_bucket(extract(epoch FROM created_at),
                                    extract(epoch FROM $1::timestamptz - $2 * interval '1 hour'),
                                    extract(epoch FROM $1::timestamptz), $3) AS bucket,
                       state, count(*) AS n
                FROM runs WHERE created_at >= $1::timestamptz - $2 * interval '1 hour'
                GROUP BY 1, 2
                """,
                now,
                hours,
                buckets,
            )
            reasons = await connection.fetch(
                """
                SELECT failure_reason, count(*) AS n FROM runs
                WHERE created_at >= $1::timestamptz - $2 * interval '1 hour'
                  AND failure_reason IS NOT NULL
                GROUP BY 1 ORDER BY 2 DESC
                """,
                now,
                hours,
            )
            latency = await connection.fetchrow(
                """
                WITH started AS (
                    SELECT r.run_id, extract(epoch FROM min(e.recorded_at) - r.created_at) AS s
                    FROM runs r JOIN run_events e ON e.run_id = r.run_id AND e.to_state = 'STARTED'
                    WHERE r.created_at >= $1::timestamptz - $2 * interval '1 hour'
                    GROUP BY r.run_id, r.created_at
                )
                SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS p50,
                       percentile_cont(0.95) WITHIN GROUP (ORDER BY s) AS p95,
                       percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99,
                       count(*) AS n
                FROM started
                """,
                now,
                hours,
            )
        span = hours * 3600 / buckets
        start = now.timestamp() - hours * 3600
        table: list[dict[str, Any]] = [
            {
                "start": datetime.fromtimestamp(start + i * span, now.tzinfo).isoformat(),
                "states": {},
            }
            for i in range(buckets)
        ]
        for row in rows:
            index = min(max(int(row["bucket"]) - 1, 0), buckets - 1)
            table[index]["states"][row["state"]] = int(row["n"])
        assert latency is not None
        return {
            "hours": hours,
            "buckets": table,
            "failure_reasons": {r["failure_reason"]: int(r["n"]) for r in reasons},
            "launch_latency_s": {
                "p50": latency["p50"],
                "p95": latency["p95"],
                "p99": latency["p99"],
            },
            "launched": int(latency["n"]),
        }
