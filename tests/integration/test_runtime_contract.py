"""``DockerRuntime`` on the real engine passes the container runtime's contract.

The runtimes reach the engine through a socket proxy that a test can cut, as when dockerd
goes away; the harness reads the engine directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import docker.errors
import pytest

from tests.conftest import SESSION_ID
from tests.contracts.runtime_contract import Described, RuntimeContract
from tests.support import DockerSocketProxy
from worker_agent.containers import LABEL_AGENT, LABEL_RUN
from worker_agent.policy import LaunchPolicy
from worker_agent.runtime import DockerRuntime


class DockerHarness:
    """The real engine; runtimes of agents unique to the test, their containers removed."""

    unpullable_image = "127.0.0.1:9/hd-contract/never:built"

    def __init__(
        self, client: docker.DockerClient, image: str, unique: str, proxy: DockerSocketProxy
    ) -> None:
        self.client = client
        self.image = image
        self.unique = unique
        self.proxy = proxy
        self._runtimes: list[DockerRuntime] = []

    def agent_id(self, n: int = 0) -> str:
        return f"t-{SESSION_ID}-{self.unique}-{n}"

    def runtime(self, n: int = 0, pull: str = "if-missing") -> DockerRuntime:
        runtime = DockerRuntime(
            self.agent_id(n), pull_timeout_s=10, threads=4, policy=LaunchPolicy(pull=pull)
        )
        self._runtimes.append(runtime)
        return runtime

    async def describe(self, container_id: str) -> Described | None:
        try:
            attrs = await asyncio.to_thread(self.client.api.inspect_container, container_id)
        except docker.errors.NotFound:
            return None
        config = attrs["Config"]
        env = dict(entry.partition("=")[::2] for entry in config["Env"] or [])
        return Described(attrs["Name"].lstrip("/"), config["Image"], config["Labels"] or {}, env)

    async def containers_of(self, run_id: uuid.UUID) -> list[str]:
        found = await asyncio.to_thread(
            self.client.api.containers, all=True, filters={"label": f"{LABEL_RUN}={run_id}"}
        )
        return [summary["Id"] for summary in found]

    def tick(self) -> None:
        pass  # the engine's clock runs by itself

    async def cut(self) -> None:
        await self.proxy.down()

    async def restore(self) -> None:
        await self.proxy.up()

    def cleanup(self) -> None:
        for runtime in self._runtimes:
            runtime.close()
        for n in range(2):
            for container in self.client.containers.list(
                all=True, filters={"label": f"{LABEL_AGENT}={self.agent_id(n)}"}
            ):
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True, v=True)


class TestDockerRuntime(RuntimeContract):
    @pytest.fixture
    async def harness(
        self,
        docker_client: docker.DockerClient,
        run_image: str,
        unique: str,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> AsyncIterator[DockerHarness]:
        proxy = DockerSocketProxy(tmp_path / "docker.sock")
        await proxy.up()
        # Every client the runtimes make (short calls, streams, pulls) goes through the proxy.
        monkeypatch.setenv("DOCKER_HOST", proxy.docker_host)
        harness = DockerHarness(docker_client, run_image, unique, proxy)
        try:
            yield harness
        finally:
            await asyncio.to_thread(harness.cleanup)
            await proxy.down()


async def test_a_log_driver_that_does_not_read_back_gives_an_empty_tail(
    docker_client: docker.DockerClient, run_image: str, unique: str
) -> None:
    """The engine answers 501 to a read of a ``none`` log driver's output: the tail is empty
    (an error there would hold the run's final event, retried for ever)."""
    agent_id = f"t-{SESSION_ID}-{unique}-logs"
    container = await asyncio.to_thread(
        docker_client.containers.create,
        run_image,
        ["true"],
        labels={LABEL_AGENT: agent_id},
        log_config=docker.types.LogConfig(type="none"),
    )
    runtime = DockerRuntime(agent_id, threads=2)
    try:
        await asyncio.to_thread(container.start)
        await asyncio.to_thread(container.wait, timeout=60)
        assert await runtime.output_tail(container.id, 5) == ()
    finally:
        runtime.close()
        await asyncio.to_thread(container.remove, force=True)


async def test_a_container_of_the_run_whose_attempt_label_is_no_number_is_fenced(
    docker_client: docker.DockerClient, run_image: str, unique: str
) -> None:
    """A container labelled with the run's id and an attempt that is no number (another
    program's, or a label edited) used to fail every later attempt of the run on the engine
    (a ValueError); it is fenced as an earlier attempt."""
    from schemas import LaunchRun
    from worker_agent.containers import LABEL_ATTEMPT

    agent_id = f"t-{SESSION_ID}-{unique}-label"
    run_id = uuid.uuid4()
    odd = await asyncio.to_thread(
        docker_client.containers.create,
        run_image,
        ["sleep", "60"],
        labels={LABEL_AGENT: agent_id, LABEL_RUN: str(run_id), LABEL_ATTEMPT: "one"},
    )
    runtime = DockerRuntime(agent_id, threads=2)
    try:
        await asyncio.to_thread(odd.start)
        launch = LaunchRun(run_id=run_id, attempt=2, image=run_image, command=("sleep", "60"))
        info, adopted = await runtime.launch(launch)
        assert not adopted
        found = await asyncio.to_thread(
            docker_client.api.containers, all=True, filters={"label": f"{LABEL_RUN}={run_id}"}
        )
        assert [summary["Id"] for summary in found] == [info.id]
    finally:
        runtime.close()
        for container in docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_RUN}={run_id}"}
        ):
            container.remove(force=True)
