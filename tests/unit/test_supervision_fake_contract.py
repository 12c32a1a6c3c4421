"""The store contract (``tests/contracts/supervision_contract.py``) against the in-memory fake."""

from __future__ import annotations

import uuid

import pytest

from dispatcher.ports import SupervisionStore
from schemas import Event, LaunchRun, SubmitRun, TerminateRun
from tests.contracts.supervision_contract import CHECKS, Check, RunSeen
from tests.fakes.clock import ManualClock
from tests.fakes.supervision import FakeSupervision


class FakeHarness:
    """Seeds ``FakeSupervision`` through its own API and reads its tables back."""

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.fake = FakeSupervision(self.clock)

    @property
    def store(self) -> SupervisionStore:
        return self.fake

    async def submit(self, submission: SubmitRun) -> None:
        await self.fake.create([submission])

    async def report(self, *events: Event) -> None:
        await self.fake.apply_events(events)

    async def elapse(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def run(self, run_id: uuid.UUID) -> RunSeen:
        run = self.fake.runs[run_id]
        return RunSeen(run.state, run.attempt, run.agent_id, run.failure_reason)

    async def agent_status(self, agent_id: str) -> str | None:
        agent = self.fake.agents_by_id.get(agent_id)
        return agent.status if agent else None

    async def terminations(self) -> list[tuple[str, uuid.UUID, int]]:
        return [
            (item.routing_key, item.message.run_id, item.message.attempt)
            for item in self.fake.written(TerminateRun)
            if isinstance(item.message, TerminateRun)
        ]

    async def launches(self, run_id: uuid.UUID) -> list[int]:
        return [
            item.message.attempt
            for item in self.fake.written(LaunchRun)
            if isinstance(item.message, LaunchRun) and item.message.run_id == run_id
        ]

    async def alert_kinds(self) -> list[str]:
        return sorted(alert.kind for alert in self.fake.alerts.values())


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
async def test_the_fake_keeps_the_store_contract(check: Check) -> None:
    await check(FakeHarness())
