"""The store contract (``tests/contracts/supervision_contract.py``) against PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from dispatcher.ports import SupervisionStore
from dispatcher.store import Database
from schemas import Event, SubmitRun
from tests.contracts.supervision_contract import CHECKS, Check, RunSeen


class PostgresHarness:
    """Seeds the real store through ``Database`` as the control plane does; reads it back."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @property
    def store(self) -> SupervisionStore:
        return self.database.supervision

    async def submit(self, submission: SubmitRun) -> None:
        await self.database.runs.create([submission])

    async def report(self, *events: Event) -> None:
        await self.database.apply_events(events)

    async def elapse(self, seconds: float) -> None:
        # Time passing, for every time recorded: the rows' timestamps move back instead.
        async with self.database.connections.transaction() as connection:
            await connection.execute(
                """
                UPDATE runs SET state_changed_at = state_changed_at - $1 * interval '1 second',
                                started_at = started_at - $1 * interval '1 second'
                """,
                seconds,
            )
            await connection.execute(
                """
                UPDATE agents SET last_heartbeat_at = last_heartbeat_at - $1 * interval '1 second',
                                  lost_at = lost_at - $1 * interval '1 second'
                """,
                seconds,
            )

    async def run(self, run_id: uuid.UUID) -> RunSeen:
        run = await self.database.runs.get(run_id)
        return RunSeen(run.state, run.attempt, run.agent_id, run.failure_reason)

    async def agent_status(self, agent_id: str) -> str | None:
        for agent in await self.database.agents.all():
            if agent["agent_id"] == agent_id:
                return str(agent["status"])
        return None

    async def terminations(self) -> list[tuple[str, uuid.UUID, int]]:
        async with self.database.connections.connection() as connection:
            records = await connection.fetch(
                "SELECT routing_key, run_id, attempt FROM outbox"
                " WHERE kind = 'TerminateRun' ORDER BY id"
            )
        return [(r["routing_key"], r["run_id"], r["attempt"]) for r in records]

    async def launches(self, run_id: uuid.UUID) -> list[int]:
        async with self.database.connections.connection() as connection:
            records = await connection.fetch(
                "SELECT attempt FROM outbox WHERE kind = 'LaunchRun' AND run_id = $1 ORDER BY id",
                run_id,
            )
        return [r["attempt"] for r in records]

    async def alert_kinds(self) -> list[str]:
        return sorted(alert["kind"] for alert in await self.database.alerts.recent(limit=1000))


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
async def test_postgresql_keeps_the_store_contract(check: Check, store: Database) -> None:
    await check(PostgresHarness(store))
