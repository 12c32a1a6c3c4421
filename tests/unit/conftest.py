"""Fixtures shared by the agent's unit tests: a fake engine and agents started on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.fakes.runtime import FakeEngine
from tests.unit.test_agent_launch import AgentUnderTest, Factory


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def agent_on(engine: FakeEngine) -> AsyncIterator[Factory]:
    """Start an agent on the engine: ``await agent_on(agent_id="a1", max_concurrent=2)``."""
    started: list[AgentUnderTest] = []

    async def make(**kwargs: Any) -> AgentUnderTest:
        agent = AgentUnderTest(engine, **kwargs)
        await agent.start()
        started.append(agent)
        return agent

    yield make
    for agent in started:
        await agent.close()
