"""The agent under load and under faults of its own: real broker, PostgreSQL and Docker."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import docker
import pytest

from dispatcher.errors import RunNotFound
from dispatcher.states import RunState
from dispatcher.store import Database, RunRow
from schemas import LaunchRun
from tests.conftest import SESSION_ID
from tests.integration.conftest import Stack
from tests.support import eventually
from worker_agent.containers import LABEL_AGENT, LABEL_ATTEMPT, LABEL_RUN
from worker_agent.runtime import DockerRuntime


@pytest.mark.parametrize("component", ["heartbeat", "consumer"])
async def test_an_agent_whose_component_fails_exits_non_zero_with_the_reason(
    stack: Stack, component: str
) -> None:
    agent = await stack.start_agent(env={"HD_AGENT_FAULT": component}, wait=False)
    assert agent.process is not None
    code = await asyncio.to_thread(agent.process.wait, 90)
    assert code == 1
    output = agent.output()
    assert f"injected fault in {component}" in output
    # It shut down in order before exiting.
    assert f"agent {stack.agent_id()} stopped" in output


async def test_a_burst_on_one_agent_succeeds_at_the_first_attempt_under_the_monitor(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_monitor()
    await stack.start_agent(max_concurrent=20)
    async with stack.client() as client:
        run_ids = [
            await client.submit(stack.run_image, ["sleep", "8"], queue=stack.queue)
            for _ in range(20)
        ]

    async def all_ended() -> list[RunRow] | None:
        runs = []
        for run_id in run_ids:
            try:
                run = await store.runs.get(run_id)
            except RunNotFound:
                return None
            if run.state not in (RunState.SUCCESS, RunState.FAILURE, RunState.CANCELED):
                return None
            runs.append(run)
        return runs

    runs = await eventually(all_ended, 180, interval=0.5, what="all 20 runs ended")
    assert [(run.state, run.attempt, run.failure_reason) for run in runs] == [
        (RunState.SUCCESS, 1, None)
    ] * 20
    for run_id in run_ids:
        events = await store.runs.events(run_id)
        assert {event.attempt for event in events} == {1}
        reasons = [event.payload.get("reason") for event in events]
        assert "UNEXPECTED_TERMINATION" not in reasons


async def test_a_retry_leaves_an_older_attempt_that_exited_0_and_removes_the_others(
    docker_client: docker.DockerClient, run_image: str, unique: str
) -> None:
    agent_id = f"t-{SESSION_ID}-{unique}"
    runtime = DockerRuntime(agent_id)
    done, failed, running = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def attempts_of(run_id: uuid.UUID) -> dict[int, str]:
        return {
            int(c.labels[LABEL_ATTEMPT]): c.status
            for c in docker_client.containers.list(
                all=True, filters={"label": f"{LABEL_RUN}={run_id}"}, ignore_removed=True
            )
        }

    async def launch(run_id: uuid.UUID, attempt: int, command: list[str]) -> None:
        await runtime.launch(
            LaunchRun(run_id=run_id, attempt=attempt, image=run_image, command=tuple(command))
        )

    try:
        await launch(done, 1, ["true"])
        await launch(failed, 1, ["sh", "-c", "exit 3"])
        await launch(running, 1, ["sleep", "60"])

        async def first_attempts_settled() -> bool:
            return (
                attempts_of(done) == {1: "exited"}
                and attempts_of(failed) == {1: "exited"}
                and attempts_of(running) == {1: "running"}
            )

        await eventually(first_attempts_settled, 30, what="attempts 1 exited / running")
        for run_id in (done, failed, running):
            await launch(run_id, 2, ["sleep", "60"])

        assert attempts_of(done) == {1: "exited", 2: "running"}
        assert attempts_of(failed) == {2: "running"}
        assert attempts_of(running) == {2: "running"}
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_AGENT}={agent_id}"}, ignore_removed=True
        ):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        runtime.close()
