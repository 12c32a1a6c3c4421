"""Once-only across hosts: agents on two Docker engines of their own (Docker in Docker).

Each agent runs on this host but drives the engine of one agent host (``DOCKER_HOST``), so
a LaunchRun that reaches both agents could start a container on each engine; Docker's events
on both engines say what really ran.
"""

from __future__ import annotations

import contextlib
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from compose.hosts import Host
from dispatcher.states import RunState
from dispatcher.store import Database
from schemas.topology import INSTRUCTIONS_EXCHANGE
from tests.integration.conftest import Stack
from tests.integration.docker_events import ContainerEvents, Life
from tests.integration.test_crashes import publish_raw
from tests.integration.test_dispatch import wait_for_state
from tests.support import Proc, eventually
from worker_agent.containers import LABEL_AGENT, LABEL_RUN

#: Agent n of a test drives host n.
A, B = 0, 1
#: Runs 20 s, or ends at once on SIGTERM (a shell as PID 1 ignores it unless it traps it).
STOPPABLE = ["sh", "-c", "trap 'exit 143' TERM; sleep 20 & wait"]


@pytest.fixture
def hosts(engine_hosts: list[Host], stack: Stack) -> Iterator[list[Host]]:
    """The session's two agent hosts; what the test's agents left on them is removed after."""
    yield engine_hosts
    for host in engine_hosts:
        host.thaw()
        for container in host.client.containers.list(all=True, filters={"label": LABEL_RUN}):
            if container.labels.get(LABEL_AGENT) in stack.agent_ids:
                with contextlib.suppress(Exception):
                    container.remove(force=True)


async def agent_on(stack: Stack, n: int, host: Host, *extra: str) -> Proc:
    return await stack.start_agent(
        n,
        max_concurrent=8,
        extra=("--keep-finished", "--engine-timeout", "1", *extra),
        env={"DOCKER_HOST": host.docker_url},
    )


def record(stack: Stack, host: Host, n: int, **kw: Any) -> ContainerEvents:
    """Docker's events of agent n's containers on its host."""
    return ContainerEvents(f"{LABEL_AGENT}={stack.agent_id(n)}", host.docker_url, **kw).start()


def started(events: ContainerEvents, run_id: uuid.UUID) -> list[Life]:
    return [life for life in events.lives() if life.run_id == str(run_id)]


async def claimants(store: Database, run_id: uuid.UUID) -> list[str]:
    """Agents that claimed the run's attempts, in the order the claims were recorded."""
    return [
        e.payload["agent_id"] for e in await store.runs.events(run_id) if e.kind == "RunClaimed"
    ]


async def test_a_launch_published_again_reaches_both_hosts_and_runs_once(
    stack: Stack, store: Database, hosts: list[Host]
) -> None:
    """The relay's row published twice more: copies reach both agents; one container runs."""
    await stack.start_control_plane()
    on_a, on_b = record(stack, hosts[A], A), record(stack, hosts[B], B)
    try:
        await agent_on(stack, A, hosts[A])
        await agent_on(stack, B, hosts[B])
        async with stack.client() as client:
            run_ids = [
                await client.submit(stack.run_image, ["sh", "-c", "sleep 2"], queue=stack.queue)
                for _ in range(6)
            ]
        async with store.connections.connection() as connection:
            for run_id in run_ids:
                payload = await eventually(
                    lambda run_id=run_id: connection.fetchval(
                        "SELECT payload FROM outbox WHERE run_id = $1 AND kind = 'LaunchRun'",
                        run_id,
                    ),
                    30,
                    what="the run's LaunchRun row",
                )
                for _ in range(2):
                    await publish_raw(
                        stack.amqp_url, INSTRUCTIONS_EXCHANGE, stack.queue, bytes(payload)
                    )
        refused = 0
        for run_id in run_ids:
            run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE)
            assert (run.state, run.attempt) == (RunState.SUCCESS, 1)
            lives = started(on_a, run_id) + started(on_b, run_id)
            assert [(life.attempt, life.exit_code) for life in lives] == [(1, 0)], lives
            holder = stack.agent_id(A if started(on_a, run_id) else B)
            assert run.agent_id == holder
            claims = await claimants(store, run_id)
            refused += sum(1 for agent in claims if agent != holder)
        # Copies reached the agent that did not hold the attempt, which never started them.
        assert refused > 0
    finally:
        on_a.stop()
        on_b.stop()


async def test_an_agent_killed_between_start_and_ack_leaves_its_launch_to_no_one_else(
    stack: Stack, store: Database, hosts: list[Host]
) -> None:
    """Agent a starts the container and is SIGKILLed before it acks: the LaunchRun goes to
    agent b on the other engine, whose claim is refused; a's next life reports the run."""
    await stack.start_control_plane()
    hit = 0
    for _ in range(3):
        agent_a = await agent_on(stack, A, hosts[A])
        agent_b: Proc | None = None

        def kill_at_start(event: dict[str, Any], agent: Proc = agent_a) -> None:
            if event["Action"] == "start" and agent.process is not None:
                agent.process.send_signal(signal.SIGKILL)

        on_a = record(stack, hosts[A], A, on_event=kill_at_start)
        on_b = record(stack, hosts[B], B)
        try:
            async with stack.client() as client:
                run_id = await client.submit(
                    stack.run_image, ["sh", "-c", "sleep 3"], queue=stack.queue
                )
            await eventually(
                _async(lambda on_a=on_a, run_id=run_id: started(on_a, run_id)),
                60,
                what="the start on host a",
            )
            assert agent_a.process is not None
            agent_a.process.wait(timeout=30)
            agent_b = await agent_on(stack, B, hosts[B])
            # The launch was redelivered to b (a had not acked it) or not (a had).
            redelivered = await eventually_or_none(
                lambda run_id=run_id: _claimed_by(store, run_id, stack.agent_id(B)), 10
            )
            agent_a = await agent_on(stack, A, hosts[A])  # a's next life adopts its container
            run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE)
            assert (run.state, run.attempt, run.agent_id) == (
                RunState.SUCCESS,
                1,
                stack.agent_id(A),
            )
            await eventually(_async(on_a.all_died), 30, what="the container's end on host a")
            assert [(life.attempt, life.exit_code) for life in started(on_a, run_id)] == [(1, 0)]
            assert started(on_b, run_id) == []  # never started on the other engine
            if redelivered:
                hit += 1
                break
        finally:
            on_a.stop()
            on_b.stop()
            for proc in (agent_a, agent_b):
                if proc is not None:
                    proc.stop()
    assert hit == 1, "agent a acked before it was killed in every try"


def _async(probe: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def probing() -> Any:
        return probe()

    return probing


async def eventually_or_none(probe: Any, timeout: float) -> Any:
    with contextlib.suppress(AssertionError):
        return await eventually(probe, timeout)
    return None


async def _started_again(store: Database, run_id: uuid.UUID) -> Any:
    run = await store.runs.get(run_id)
    return run if (run.state, run.attempt) == (RunState.STARTED, 2) else None


async def _claimed_by(store: Database, run_id: uuid.UUID, agent_id: str) -> bool:
    return agent_id in await claimants(store, run_id)


async def test_a_frozen_engine_s_runs_fail_over_and_its_stale_containers_are_stopped(
    stack: Stack, store: Database, hosts: list[Host]
) -> None:
    await stack.start_control_plane()
    await stack.start_monitor()
    on_a, on_b = record(stack, hosts[A], A), record(stack, hosts[B], B)
    try:
        await agent_on(stack, A, hosts[A])
        async with stack.client() as client:
            run_ids = [
                await client.submit(stack.run_image, STOPPABLE, queue=stack.queue) for _ in range(3)
            ]
        for run_id in run_ids:
            await wait_for_state(store, run_id, RunState.STARTED)
        await agent_on(stack, B, hosts[B])
        hosts[A].freeze()  # its dockerd SIGSTOPped; its containers run on
        for run_id in run_ids:
            run = await eventually(
                lambda run_id=run_id: _started_again(store, run_id), 60, what="failed over"
            )
            assert run.agent_id == stack.agent_id(B)
        lost = await store.runs.events(run_ids[0])
        [decision] = [e for e in lost if e.kind == "RunFailed" and e.attempt == 1]
        assert "its Docker engine has not answered" in decision.payload["message"]
        hosts[A].thaw()
        # Back: its attempt-1 containers are stopped (143: by SIGTERM, long before their end).
        await eventually(
            _async(lambda: len([life for life in on_a.lives() if life.died is not None]) == 3),
            60,
            what="the stale containers stopped on host a",
        )
        assert [life.exit_code for life in on_a.lives()] == [143] * 3
        for run_id in run_ids:
            run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE)
            assert (run.state, run.attempt) == (RunState.SUCCESS, 2)
            successes = [
                life
                for life in started(on_a, run_id) + started(on_b, run_id)
                if life.exit_code == 0
            ]
            assert [life.attempt for life in successes] == [2]
    finally:
        hosts[A].thaw()
        on_a.stop()
        on_b.stop()
