"""Draining an agent on a real broker, database and engine: it takes no new work, its running
containers finish and report SUCCESS, it exits 0, shows DRAINING then LEFT, and nothing is
failed over."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

from dispatcher.states import RunState
from dispatcher.store import Database
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.support import eventually


async def status_of(store: Database, agent_id: str) -> str | None:
    for agent in await store.agents.all():
        if agent["agent_id"] == agent_id:
            return str(agent["status"])
    return None


async def test_a_draining_agent_finishes_its_runs_takes_no_new_one_and_exits_0(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    # Not about a lost agent: a slow heartbeat on a loaded machine must not fail a run over.
    await stack.start_monitor(("--lost-after-beats", "20"))
    agent = await stack.start_agent(0, max_concurrent=2)
    agent_id = stack.agent_id(0)
    async with stack.client() as client:
        running = [
            await client.submit(stack.run_image, ["sleep", "4"], queue=stack.queue)
            for _ in range(2)
        ]
        for run_id in running:
            await wait_for_state(store, run_id, RunState.STARTED, timeout=60)

        assert agent.process is not None
        drained = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "worker_agent", "drain", str(agent.process.pid)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert drained.returncode == 0, drained.stderr
        await agent.wait_for_output("draining: no new work; waiting for 2 run", timeout=30)

        async def draining() -> bool:
            return await status_of(store, agent_id) == "DRAINING"

        await eventually(draining, 30, what="the agent listed as DRAINING")
        later = await client.submit(stack.run_image, ["true"], queue=stack.queue)

    for run_id in running:
        run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE, timeout=60)
        assert (run.state, run.attempt) == (RunState.SUCCESS, 1)
    assert await asyncio.to_thread(agent.process.wait, 60) == 0
    assert "drained: every run finished and was reported" in agent.output()

    # Gone quiet after a complete drain: LEFT, not LOST; nothing failed over, no alert.
    async def left() -> bool:
        return await status_of(store, agent_id) == "LEFT"

    await eventually(left, 30, what="the drained agent listed as LEFT")
    assert (await store.runs.get(later)).state == RunState.QUEUED
    assert stack.containers_of(later) == []
    assert [a["kind"] for a in await store.alerts.recent()] == []


async def test_with_drain_sigterm_drains_and_a_second_sigterm_stops(stack: Stack) -> None:
    await stack.start_control_plane()
    agent = await stack.start_agent(0, extra=("--drain", "--drain-timeout", "600"))
    async with stack.client() as client:
        await client.submit(stack.run_image, ["sleep", "300"], queue=stack.queue)
    await agent.wait_for_output("started container", timeout=60)
    agent.signal(signal.SIGTERM)
    await agent.wait_for_output("SIGTERM: draining", timeout=30)
    await agent.wait_for_output("waiting for 1 run", timeout=30)
    assert agent.process is not None and agent.process.poll() is None  # still draining
    agent.signal(signal.SIGTERM)  # enough: stop now, leaving the container to be adopted
    assert await asyncio.to_thread(agent.process.wait, 60) == 0
    assert "SIGTERM: shutting down" in agent.output()
