"""Claims on the agent: an attempt's container starts only once its claim is granted.

The control plane's answers are played by ``AgentUnderTest`` (a grant for every claim unless
the test refuses it); the control plane's side is ``tests/integration/test_claims.py``.
"""

from __future__ import annotations

import asyncio

import pytest

from schemas import LaunchGranted, LaunchRun, RunClaimed, RunLaunched, TerminateRun
from tests.fakes.broker import FakeDelivery
from tests.fakes.clock import until
from tests.fakes.runtime import RUN_IMAGE, FakeEngine
from tests.unit.test_agent_launch import (
    SLEEP,
    AgentUnderTest,
    Factory,
    launch_of,
    only_container,
)
from worker_agent.containers import container_name

pytestmark = pytest.mark.unit


async def waiting_for_the_answer(
    engine: FakeEngine, agent_on: Factory
) -> tuple[AgentUnderTest, LaunchRun, asyncio.Task[FakeDelivery]]:
    """An agent whose claims go unanswered, handling a launch: its container created."""
    agent = await agent_on()
    agent.unanswered = True
    launch = launch_of()
    handling = asyncio.create_task(agent.deliver(launch))
    await until(lambda: engine.containers, what="the container created")
    return agent, launch, handling


async def test_the_container_is_created_while_the_claim_waits_and_started_once_granted(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent, launch, handling = await waiting_for_the_answer(engine, agent_on)
    [claim] = agent.events(RunClaimed)
    assert (claim.run_id, claim.attempt, claim.agent_id) == (launch.run_id, 1, "a1")
    await asyncio.sleep(0.05)
    assert only_container(engine).status == "created"  # not started before the answer
    assert not handling.done()
    # A grant for another agent is not this one's.
    await agent.deliver(LaunchGranted(run_id=launch.run_id, attempt=1, agent_id="a2"))
    await asyncio.sleep(0.05)
    assert only_container(engine).status == "created"
    granted = await agent.deliver(LaunchGranted(run_id=launch.run_id, attempt=1, agent_id="a1"))
    delivery = await asyncio.wait_for(handling, 30)
    assert (granted.settlements, delivery.settlements) == (["ack"], ["ack"])
    assert only_container(engine).status == "running"
    assert agent.of_run(launch.run_id) == ["RunLaunched", "RunStarted"]


async def test_a_refused_claim_removes_the_container_unstarted_and_acks(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of()
    agent.refused.add((launch.run_id, 1))
    delivery = await agent.deliver(launch)
    assert delivery.settlements == ["ack"]
    assert engine.containers == {}
    assert [type(e).__name__ for e in agent.events(RunClaimed)] == ["RunClaimed"]
    assert agent.events() == []  # nothing reported: the attempt is another agent's
    assert agent.slots.free() == 2
    # The refusal fenced the attempt: delivered again, it is acked and never created.
    again = await agent.deliver(launch)
    assert again.settlements == ["ack"]
    assert engine.containers == {}
    assert len(agent.events(RunClaimed)) == 1


async def test_a_late_refusal_of_a_running_container_stops_it(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """A container already running (adopted after a restart) is not held back by its claim;
    a refusal that comes then stops it like any TerminateRun."""
    launch = launch_of()
    info, _ = await engine.runtime("a1").launch(launch)  # the previous life's
    agent = await agent_on()
    agent.unanswered = True
    delivery = await agent.deliver(launch)
    assert delivery.settlements == ["ack"]
    assert engine.get(info.id).status == "running"
    refusal = TerminateRun(
        run_id=launch.run_id, attempt=1, reason="claim refused: held by a2", grace_s=0
    )
    await agent.deliver(refusal)
    await until(lambda: engine.get(info.id) is None or engine.get(info.id).finished, what="stop")


async def test_a_stop_while_the_claim_waits_sends_the_launch_back_and_removes_the_container(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent, _, handling = await waiting_for_the_answer(engine, agent_on)
    agent.stopping.set()
    delivery = await asyncio.wait_for(handling, 30)
    assert delivery.settlements == ["nack(requeue=True)"]
    assert engine.containers == {}
    assert agent.events(RunLaunched) == []
    assert agent.slots.free() == 2


async def test_on_start_a_container_created_and_never_started_is_removed(
    engine: FakeEngine, agent_on: Factory
) -> None:
    launch = launch_of()
    engine.create(
        RUN_IMAGE,
        SLEEP,
        container_name(launch.run_id, 1),
        engine.runtime("a1").labels_for(launch),
        {},
    )
    agent = await agent_on()
    await until(lambda: engine.containers == {}, what="the unstarted container removed")
    assert agent.events() == []
    assert agent.slots.free() == 2


async def test_an_attempt_whose_container_another_agent_made_here_is_left_to_it(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """Two agents on one engine both get the attempt: the second finds the first's container
    by its name and leaves it alone (neither starts, stops nor removes it)."""
    launch = launch_of()
    theirs, _ = await engine.runtime("a2").create(launch)  # a2 waits for its claim's answer
    agent = await agent_on(agent_id="a1")
    delivery = await agent.deliver(launch)
    assert delivery.settlements == ["ack"]
    assert only_container(engine).id == theirs.id
    assert only_container(engine).status == "created"
    assert agent.events() == []
    assert agent.slots.free() == 2
