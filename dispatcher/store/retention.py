"""Retention: what a finished run leaves behind, pruned once it is old enough.

A run's row stays (its state, exit code, output tail and failure are its record); its
history (``run_events``), forwarded output (``run_logs``) and progress (``run_progress``) go
once it has been finished for longer than the age given, and so do outbox rows sent before
then. Each table is pruned in batches, each batch its own short transaction, so that no lock
is held for long and the control plane's work goes on beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .connections import Connections

_FINISHED_BEFORE = """
    SELECT run_id FROM runs
    WHERE state IN ('SUCCESS', 'FAILURE', 'CANCELED')
      AND finished_at < now() - $1 * interval '1 second'
"""

#: One batch of each table: at most $2 rows older than $1 seconds.
_BATCHES = {
    "outbox": """
        DELETE FROM outbox WHERE id IN (
            SELECT id FROM outbox WHERE sent_at < now() - $1 * interval '1 second' LIMIT $2
        )
    """,
    "run_events": f"""
        DELETE FROM run_events WHERE seq IN (
            SELECT seq FROM run_events WHERE run_id IN ({_FINISHED_BEFORE}) LIMIT $2
        )
    """,
    "run_logs": f"""
        DELETE FROM run_logs WHERE ctid IN (
            SELECT ctid FROM run_logs WHERE run_id IN ({_FINISHED_BEFORE}) LIMIT $2
        )
    """,
    "run_progress": f"""
        DELETE FROM run_progress WHERE ctid IN (
            SELECT ctid FROM run_progress WHERE run_id IN ({_FINISHED_BEFORE}) LIMIT $2
        )
    """,
}


@dataclass(frozen=True)
class Pruned:
    """Rows deleted, per table."""

    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class Retention:
    """Prunes what finished runs leave behind."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    async def prune(self, older_than_s: float, batch: int = 1000) -> Pruned:
        """Delete, table by table and ``batch`` rows at a time, what is older than
        ``older_than_s`` seconds (see the module docstring)."""
        counts: dict[str, int] = {}
        for table, statement in _BATCHES.items():
            total = 0
            while True:
                async with self._connections.transaction() as connection:
                    status = await connection.execute(statement, older_than_s, batch)
                deleted = int(status.split()[-1])
                total += deleted
                if deleted < batch:
                    break
            counts[table] = total
        return Pruned(counts)
