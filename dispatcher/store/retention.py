"""Retention: what a finished run leaves behind, pruned once it is old enough.

A run's row stays (its state, exit code, output tail and failure are its record); its
history (``run_events``), forwarded output (``run_logs``) and progress (``run_progress``) go
once it has been finished for longer than the age given, and so do outbox rows sent before
then. Each table is pruned in batches, each batch its own short transaction, so that no lock
is held for long and the control plane's work goes on beside it.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass

from .connections import Connections

#: Finished runs old enough, in the order of the index that finds them (migration 21), from
#: a point on: a round starts where the round before reached, rather than from the first
#: run ever finished (each batch scanned the history tables from their start, past what
#: earlier batches had deleted: 40,000 finished runs took 7 s, twice as long as 20,000).
_FINISHED = """
    SELECT run_id, finished_at FROM runs
    WHERE state IN ('SUCCESS', 'FAILURE', 'CANCELED')
      AND finished_at < now() - $1 * interval '1 second'
      AND (finished_at, run_id) > ($2, $3)
    ORDER BY finished_at, run_id
    LIMIT $4
"""
#: How far before the point the last round reached the next one starts.
MARGIN = datetime.timedelta(hours=1)
#: Runs whose history one transaction deletes (each table at most ``batch`` rows at a time).
RUNS_AT_ONCE = 200

#: A batch of one table: at most $2 rows of the runs $1.
_HISTORY = {
    table: f"""
        DELETE FROM {table} WHERE ctid IN (
            SELECT ctid FROM {table} WHERE run_id = ANY($1::uuid[]) LIMIT $2
        )
    """
    for table in ("run_events", "run_logs", "run_progress")
}
_OUTBOX = """
    DELETE FROM outbox WHERE id IN (
        SELECT id FROM outbox WHERE sent_at < now() - $1 * interval '1 second' LIMIT $2
    )
"""
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


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
        #: The last finished run whose history a round went through: the next starts after.
        self._reached: tuple[datetime.datetime, uuid.UUID] | None = None
        self._age: float | None = None

    async def prune(self, older_than_s: float, batch: int = 1000) -> Pruned:
        """Delete, ``batch`` rows at a time, what is older than ``older_than_s`` seconds
        (see the module docstring)."""
        counts = {"outbox": 0, **dict.fromkeys(_HISTORY, 0)}
        while True:
            async with self._connections.transaction() as connection:
                status = await connection.execute(_OUTBOX, older_than_s, batch)
            deleted = int(status.split()[-1])
            counts["outbox"] += deleted
            if deleted < batch:
                break
        # Rounds with another age start from the first run again (an age made shorter has
        # runs before the point reached that are now old enough).
        reached = self._reached if older_than_s == self._age else None
        self._age = older_than_s
        # From a while before the point reached: a run whose finish committed late (its
        # transaction began before the last round) is not passed by for good.
        since = (reached[0] - MARGIN, uuid.UUID(int=0)) if reached else (_EPOCH, uuid.UUID(int=0))
        while True:
            async with self._connections.connection() as connection:
                runs = await connection.fetch(_FINISHED, older_than_s, *since, RUNS_AT_ONCE)
            if not runs:
                break
            run_ids = [row["run_id"] for row in runs]
            for table, statement in _HISTORY.items():
                while True:
                    async with self._connections.transaction() as connection:
                        status = await connection.execute(statement, run_ids, batch)
                    deleted = int(status.split()[-1])
                    counts[table] += deleted
                    if deleted < batch:
                        break
            since = (runs[-1]["finished_at"], runs[-1]["run_id"])
            self._reached = since
        return Pruned(counts)
