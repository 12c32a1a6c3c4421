"""The failure monitor against real processes and real faults."""

from __future__ import annotations

import signal
import time
import uuid

from dispatcher.errors import RunNotFound
from dispatcher.states import RunState
from dispatcher.store import Database
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.support import eventually
from worker_agent.containers import LABEL_AGENT, LABEL_ATTEMPT, LABEL_RUN


def running_containers(stack: Stack, run_id: uuid.UUID) -> list[tuple[str, int]]:
    """(agent id, attempt) of every running container of a run, as Docker reports them."""
    found = []
    for container in stack.docker.containers.list(
        filters={"label": f"{LABEL_RUN}={run_id}"}, ignore_removed=True
    ):
        if container.status == "running":
            found.append((container.labels[LABEL_AGENT], int(container.labels[LABEL_ATTEMPT])))
    return sorted(found)


async def runs_on(store: Database, run_ids: list[uuid.UUID], agent_id: str, attempt: int) -> bool:
    for run_id in run_ids:
        try:
            run = await store.runs.get(run_id)
        except RunNotFound:
            return False
        if not (
            run.state == RunState.STARTED and run.agent_id == agent_id and run.attempt == attempt
        ):
            return False
    return True


async def agent_status(store: Database, agent_id: str, status: str) -> bool:
    """Whether PostgreSQL records ``agent_id`` with ``status`` (ALIVE, LOST)."""
    return any(
        a["agent_id"] == agent_id and a["status"] == status for a in await store.agents.all()
    )


async def test_a_killed_agent_s_runs_fail_over_to_another_agent_exactly_once(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_monitor()
    first = await stack.start_agent(0, max_concurrent=5)
    async with stack.client() as client:
        run_ids = [
            await client.submit(stack.run_image, ["sleep", "60"], queue=stack.queue)
            for _ in range(5)
        ]
    await eventually(lambda: runs_on(store, run_ids, stack.agent_id(0), 1), 60, what="5 on A")
    await stack.start_agent(1, max_concurrent=5)
    killed_at = time.time()
    first.kill()

    # Every run: attempt 1 failed AGENT_LOST, attempt 2 runs on the second agent.
    await eventually(lambda: runs_on(store, run_ids, stack.agent_id(1), 2), 60, what="on B")
    for run_id in run_ids:
        lost = [
            e for e in await store.runs.events(run_id) if e.payload.get("reason") == "AGENT_LOST"
        ]
        assert len(lost) == 1
        assert lost[0].attempt == 1
        assert lost[0].to_state == "QUEUED"  # retried, per the default policy
        detected = lost[0].recorded_at.timestamp() - killed_at
        print(f"run {run_id}: AGENT_LOST recorded {detected:.2f} s after the kill")

    # The killed agent never comes back; its containers were on the same engine, and the
    # second agent removed them before starting attempt 2.

    async def one_each() -> bool:
        return all(running_containers(stack, r) == [(stack.agent_id(1), 2)] for r in run_ids)

    await eventually(one_each, 60, what="exactly one live container per run, attempt 2")
    for run_id in run_ids:
        assert (await store.runs.get(run_id)).attempt == 2


async def test_a_frozen_agent_is_fenced_when_it_thaws(stack: Stack, store: Database) -> None:
    await stack.start_control_plane()
    await stack.start_monitor()
    frozen = await stack.start_agent(0, max_concurrent=2)
    async with stack.client() as client:
        run_ids = [
            await client.submit(stack.run_image, ["sleep", "60"], queue=stack.queue)
            for _ in range(2)
        ]
    await eventually(lambda: runs_on(store, run_ids, stack.agent_id(0), 1), 60, what="on A")
    await stack.start_agent(1, max_concurrent=2)
    frozen.signal(signal.SIGSTOP)
    try:
        # The freeze lasts until everything it causes is visible: the agent declared lost in
        # PostgreSQL, every run on attempt 2 of the second agent, and in Docker only attempt
        # 2 alive (the second agent removed the frozen one's containers on the same engine).
        await eventually(lambda: runs_on(store, run_ids, stack.agent_id(1), 2), 60, what="on B")
        await eventually(lambda: agent_status(store, stack.agent_id(0), "LOST"), 60, what="lost")

        async def only_attempt_2() -> bool:
            return all(running_containers(stack, r) == [(stack.agent_id(1), 2)] for r in run_ids)

        await eventually(only_attempt_2, 60, what="only attempt 2 alive while A is frozen")
    finally:
        frozen.signal(signal.SIGCONT)
    # Thawed, the agent learns that its attempts were failed over and reports their end
    # (events of superseded attempts, which change nothing).

    async def superseded_reported() -> bool:
        for run_id in run_ids:
            reports = [
                e
                for e in await store.runs.events(run_id)
                if e.attempt == 1
                and e.kind in ("RunSucceeded", "RunFailed")
                and e.payload.get("agent_id") == stack.agent_id(0)
            ]
            if not reports:
                return False
            assert [(e.from_state, e.to_state) for e in reports] == [(None, None)]
        return True

    await eventually(superseded_reported, 60, what="the thawed agent reporting attempt 1's end")

    async def one_each() -> bool:
        return all(running_containers(stack, r) == [(stack.agent_id(1), 2)] for r in run_ids)

    await eventually(one_each, 60, what="only attempt 2 alive for each run")
    for run_id in run_ids:
        run = await store.runs.get(run_id)
        assert (run.state, run.attempt, run.agent_id) == (RunState.STARTED, 2, stack.agent_id(1))


async def test_docker_kill_of_a_run_container_is_reported_as_exit_137(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_monitor()
    await stack.start_agent()
    async with stack.client() as client:
        run_id = await client.submit(stack.run_image, ["sleep", "60"], queue=stack.queue)
    await wait_for_state(store, run_id, RunState.STARTED)
    [container] = stack.containers_of(run_id)
    killed_at = time.time()
    container.kill()
    run = await wait_for_state(store, run_id, RunState.FAILURE, RunState.SUCCESS)
    assert run.state == RunState.FAILURE
    assert run.exit_code == 137
    assert run.failure_reason == "EXIT_CODE"
    # Reported by the agent that ran it, as PostgreSQL recorded it.
    [failed] = [e for e in await store.runs.events(run_id) if e.kind == "RunFailed"]
    assert failed.attempt == 1
    assert failed.payload["agent_id"] == stack.agent_id()
    assert failed.payload["exit_code"] == 137
    detected = failed.recorded_at.timestamp() - killed_at
    print(f"docker kill: exit recorded {detected:.2f} s after the kill")


async def test_a_run_over_its_memory_limit_fails_with_oom(stack: Stack, store: Database) -> None:
    await stack.start_control_plane()
    await stack.start_agent()
    async with stack.client() as client:
        run_id = await client.submit(
            stack.run_image,
            ["sh", "-c", "big=$(head -c 200000000 /dev/zero | tr '\\0' x); echo ${#big}"],
            queue=stack.queue,
            memory_limit_mb=16,
        )
    run = await wait_for_state(store, run_id, RunState.FAILURE, RunState.SUCCESS, timeout=120)
    assert run.state == RunState.FAILURE
    assert run.failure_reason == "OOM"


async def test_a_run_that_cannot_start_in_time_fails_and_leaves_no_container(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_monitor()
    await stack.start_agent()
    async with stack.client() as client:
        # Its ready check never passes: it stays STARTING.
        run_id = await client.submit(
            stack.run_image,
            ["sleep", "60"],
            queue=stack.queue,
            start_timeout_s=2,
            ready_check=["false"],
        )
    # STARTING lasts 2 s: a poll may miss it, its recorded history may not.
    run = await wait_for_state(store, run_id, RunState.FAILURE, RunState.SUCCESS, timeout=60)
    assert run.failure_reason == "START_TIMEOUT"
    history = [event.to_state for event in await store.runs.events(run_id)]
    assert "STARTING" in history

    async def no_container() -> bool:
        return stack.containers_of(run_id) == []

    await eventually(no_container, 60, what="the container stopped and removed")


async def test_a_run_past_its_max_runtime_is_stopped(stack: Stack, store: Database) -> None:
    await stack.start_control_plane()
    await stack.start_monitor()
    await stack.start_agent()
    async with stack.client() as client:
        run_id = await client.submit(
            stack.run_image, ["sleep", "60"], queue=stack.queue, max_runtime_s=1
        )
    run = await wait_for_state(store, run_id, RunState.FAILURE, RunState.SUCCESS, timeout=60)
    assert run.failure_reason == "MAX_RUNTIME"

    async def no_container() -> bool:
        return stack.containers_of(run_id) == []

    await eventually(no_container, 60, what="the container stopped and removed")


async def test_a_run_its_agent_no_longer_knows_is_unexpected_termination(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    # The agent must come back before it is declared lost, whatever the time a process
    # takes to start on this machine: 60 beats of 0.5 s give it 30 s instead of 1.5 s.
    await stack.start_monitor(extra=("--lost-after-beats", "60"))
    agent = await stack.start_agent()
    async with stack.client() as client:
        run_id = await client.submit(
            stack.run_image, ["sleep", "60"], queue=stack.queue, max_retries=0
        )
    await wait_for_state(store, run_id, RunState.STARTED)
    # The agent dies, its container is removed meanwhile, and the agent comes back before it
    # is declared lost: its heartbeats no longer list the run.
    agent.kill()
    for container in stack.containers_of(run_id):
        container.remove(force=True)
    await stack.start_agent()
    run = await wait_for_state(store, run_id, RunState.FAILURE, RunState.SUCCESS, timeout=60)
    assert run.failure_reason == "UNEXPECTED_TERMINATION"
    assert [a["status"] for a in await store.agents.all()] == ["ALIVE"]
    reasons = [e.payload.get("reason") for e in await store.runs.events(run_id)]
    assert "AGENT_LOST" not in reasons
