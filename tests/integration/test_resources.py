"""Per-run resources and agent capacity on a real broker, database and engine.

A run that fits no live agent of its queue is refused at submission with the reason; an
agent never runs more than its declared CPUs at once (read from Docker's own start and die
events, not from our tables); a GPU run gets a GPU device request, and on a host with no GPU
runtime it fails with the engine's reason instead of hanging.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import docker
import pytest

from dispatcher.errors import RunNotFound, SubmissionRejected
from dispatcher.states import RunState
from dispatcher.store import Database
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.integration.test_operators import dispatcher_cli
from tests.support import eventually
from worker_agent.containers import LABEL_AGENT, LABEL_RUN

CPU = 1_000_000_000


async def declared(store: Database, agent_id: str, **capacity: Any) -> None:
    """Wait until the store holds the agent ALIVE with that capacity (from its heartbeat)."""

    async def probe() -> bool:
        for agent in await store.agents.all():
            if agent["agent_id"] == agent_id and agent["status"] == "ALIVE":
                return all(agent[k] == v for k, v in capacity.items())
        return False

    await eventually(probe, 30, what=f"agent {agent_id} declaring {capacity}")


async def test_a_run_that_fits_no_live_agent_is_refused_at_submission_with_the_reason(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(0, extra=("--cpus", "1"))
    await declared(store, stack.agent_id(0), cpus=1.0, memory_mb=None, gpus=0)
    queue = stack.queue

    async with stack.client() as client:
        for asks, reason in (
            (
                {"cpus": 2.0},
                f"the run asks for 2 CPUs; the largest live agent of queue {queue} offers 1 CPU",
            ),
            (
                {"gpus": 1},
                f"the run asks for 1 GPU; the largest live agent of queue {queue} offers 0 GPUs",
            ),
        ):
            with pytest.raises(SubmissionRejected) as refused:
                await client.submit_and_wait(
                    stack.run_image, ["true"], queue=queue, timeout=60, **asks
                )
            assert str(refused.value) == reason
        # What fits is accepted and runs.
        fits = await client.submit(stack.run_image, ["true"], queue=queue, cpus=1.0)
    run = await wait_for_state(store, fits, RunState.SUCCESS, RunState.FAILURE)
    assert run.state == RunState.SUCCESS
    # The refused ones left no run behind.
    assert [r.run_id for r in await store.runs.recent()] == [fits]

    # `dispatcher submit --wait` says so, and that no run was created.
    result = await dispatcher_cli(
        stack, "submit", "--image", stack.run_image, "--queue", queue, "--cpus", "3", "--wait"
    )
    assert result.returncode == 2
    printed = uuid.UUID(result.stdout.strip())
    assert f"submission rejected, run {printed} not created: the run asks for 3 CPUs" in (
        result.stderr
    )
    with pytest.raises(RunNotFound):
        await store.runs.get(printed)


def peak(events: list[dict[str, Any]], weight: dict[str, int]) -> int:
    """The most ``weight`` (by run id) running at once, by Docker's start and die events."""
    now = top = 0
    for event in sorted(events, key=lambda e: (e["timeNano"], e["Action"] == "start")):
        run = event["Actor"]["Attributes"].get(LABEL_RUN, "")
        now += weight.get(run, 0) * (1 if event["Action"] == "start" else -1)
        top = max(top, now)
    return top


async def test_an_agent_never_runs_more_cpus_at_once_than_it_declares(
    stack: Stack, store: Database, docker_client: docker.DockerClient
) -> None:
    await stack.start_control_plane()
    agent_id = stack.agent_id(0)
    await stack.start_agent(0, max_concurrent=4, extra=("--cpus", "1", "--keep-finished"))
    await declared(store, agent_id, cpus=1.0)
    since = int(time.time()) - 1

    asked = [1.0, 1.0, 1.0, 0.5, 0.5]
    async with stack.client() as client:
        runs = {
            await client.submit(stack.run_image, ["sleep", "2"], queue=stack.queue, cpus=cpus): cpus
            for cpus in asked
        }
    for run_id in runs:
        run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE, timeout=120)
        assert run.state == RunState.SUCCESS, run.failure_message

    # Each container got its CPUs, and Docker saw no more than 1 CPU's worth run at once.
    for run_id, cpus in runs.items():
        [container] = stack.containers_of(run_id)
        assert container.attrs["HostConfig"]["NanoCpus"] == int(cpus * CPU)
    events = list(
        docker_client.events(
            since=since,
            until=int(time.time()) + 1,
            filters={
                "type": "container",
                "event": ["start", "die"],
                "label": f"{LABEL_AGENT}={agent_id}",
            },
            decode=True,
        )
    )
    assert [e["Action"] for e in events].count("start") == len(asked)
    assert [e["Action"] for e in events].count("die") == len(asked)
    ids = {str(run_id): cpus for run_id, cpus in runs.items()}
    assert peak(events, {r: int(c * CPU) for r, c in ids.items()}) == CPU
    assert peak(events, {r: 1 for r, c in ids.items() if c == 1.0}) == 1


async def test_a_gpu_run_asks_docker_for_a_gpu_and_fails_clearly_without_one(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(0, extra=("--gpus", "1", "--keep-finished"))
    await declared(store, stack.agent_id(0), gpus=1)
    async with stack.client() as client:
        outcome = await client.submit_and_wait(
            stack.run_image, ["true"], queue=stack.queue, gpus=1, timeout=120
        )
    # This host has no GPU runtime: the engine refuses to start the container.
    assert (outcome.state, outcome.reason) == ("FAILURE", "LAUNCH_ERROR")
    assert 'could not select device driver "" with capabilities: [[gpu]]' in outcome.message
    run = await store.runs.get(outcome.run_id)
    assert (run.state, run.attempt) == (RunState.FAILURE, 1)

    [container] = stack.containers_of(outcome.run_id)
    [request] = container.attrs["HostConfig"]["DeviceRequests"]
    assert (request["Count"], request["Capabilities"]) == (1, [["gpu"]])
    assert container.status == "created"  # never started

    # Its GPU was given back: the agent takes the next GPU run (which fails the same way).
    async with stack.client() as client:
        again = await client.submit_and_wait(
            stack.run_image, ["true"], queue=stack.queue, gpus=1, timeout=120
        )
    assert again.reason == "LAUNCH_ERROR"
