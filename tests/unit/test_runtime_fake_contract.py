"""The in-memory Docker engine passes the container runtime's contract."""

from __future__ import annotations

import uuid

import pytest

from tests.contracts.runtime_contract import Described, RuntimeContract
from tests.fakes.runtime import RUN_IMAGE, FakeDockerRuntime, FakeEngine
from worker_agent.containers import LABEL_RUN


class FakeHarness:
    """One in-memory engine; agents ``agent-<n>`` on it."""

    image = RUN_IMAGE
    unpullable_image = "127.0.0.1:9/hd-contract/never:built"

    def __init__(self) -> None:
        self.engine = FakeEngine()

    def agent_id(self, n: int = 0) -> str:
        return f"agent-{n}"

    def runtime(self, n: int = 0, pull: str = "if-missing") -> FakeDockerRuntime:
        return self.engine.runtime(self.agent_id(n), pull)

    async def describe(self, container_id: str) -> Described | None:
        container = self.engine.find(container_id)
        if container is None:
            return None
        config = container.attrs()["Config"]
        env = dict(entry.partition("=")[::2] for entry in config["Env"])
        return Described(container.name, config["Image"], config["Labels"], env)

    async def containers_of(self, run_id: uuid.UUID) -> list[str]:
        return [c.id for c in self.engine.labelled(**{LABEL_RUN: str(run_id)})]

    def tick(self) -> None:
        self.engine.check_health()

    async def cut(self) -> None:
        self.engine.stop_answering()

    async def restore(self) -> None:
        self.engine.answer_again()


class TestFakeRuntime(RuntimeContract):
    @pytest.fixture
    def harness(self) -> FakeHarness:
        return FakeHarness()
