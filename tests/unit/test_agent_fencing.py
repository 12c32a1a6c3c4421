"""A TerminateRun for an attempt the agent has not started: its LaunchRun never starts.

A canceled QUEUED run is terminated on every live agent of its queue, because its LaunchRun
may still be on its way, held for a slot, or being launched. The launcher, reporter, watcher
and slots are the real ones; only the engine and the broker are fakes.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from schemas import FailureReason, LaunchRun, RunFailed, RunSucceeded, TerminateRun
from tests.fakes.clock import until
from tests.fakes.runtime import FakeEngine
from tests.unit.test_agent_launch import Factory, launch_of, only_container
from transport.errors import BrokerRefused, BrokerUnavailable
from worker_agent.containers import LABEL_RUN

pytestmark = pytest.mark.unit


def terminate_of(launch: LaunchRun, **kw: Any) -> TerminateRun:
    kw.setdefault("reason", "canceled")
    kw.setdefault("grace_s", 0)
    return TerminateRun(run_id=launch.run_id, attempt=launch.attempt, **kw)


def containers_of(engine: FakeEngine, run_id: uuid.UUID) -> list[Any]:
    return engine.labelled(**{LABEL_RUN: str(run_id)})


class GatedKeeper:
    """A location keeper whose code server answers only when told: the launch holds its
    slot, with no container yet, for as long as the test wants."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()

    async def launch_spec(self, launch: LaunchRun) -> LaunchRun:
        self.asked.set()
        await self.answer.wait()
        return launch


async def test_a_launch_terminated_before_it_arrived_is_acked_and_never_started(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of()
    terminated = await agent.deliver(terminate_of(launch))
    delivered = await agent.deliver(launch)
    again = await agent.deliver(launch)  # redelivered: still not run
    assert [d.settlements for d in (terminated, delivered, again)] == [["ack"]] * 3
    assert engine.containers == {}
    assert agent.events() == []
    assert (agent.slots.free(), agent.slots.prefetch()) == (2, 2)
    assert agent.slots.in_flight() == ()
    # Only that attempt is fenced: a later attempt of the run starts.
    retry = launch_of(run_id=launch.run_id, attempt=2)
    assert (await agent.deliver(retry)).settlements == ["ack"]
    assert only_container(engine).status == "running"
    assert agent.of_run(launch.run_id)[0] == "RunLaunched"


async def test_a_launch_held_for_a_slot_is_dropped_at_once_when_terminated(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on(max_concurrent=1)
    busy = launch_of()
    await agent.deliver(busy)
    held = launch_of()
    handling = asyncio.create_task(agent.deliver(held))
    await until(lambda: agent.slots.waiting == 1, what="the launch held for a slot")
    assert agent.slots.prefetch() == 0

    terminated = await agent.deliver(terminate_of(held))
    # Done while the only slot is still busy: it did not wait for one.
    delivery = await asyncio.wait_for(handling, 30)
    assert (terminated.settlements, delivery.settlements) == (["ack"], ["ack"])
    assert agent.slots.waiting == 0
    assert [s.run_id for s in agent.slots.in_flight()] == [busy.run_id]

    # The busy slot frees: nothing starts for the dropped launch, the slot is open again.
    engine.exit(only_container(engine).id, 0)
    await agent.reported(busy.run_id)
    await until(lambda: agent.slots.prefetch() == 1, what="the slot freed")
    # The exit frees the slot at once; the container goes once its report is out.
    await until(lambda: engine.containers == {}, what="the container removed")
    assert agent.of_run(held.run_id) == []
    assert [(s.run_id, s.state) for s in agent.slots.in_flight()] == [(busy.run_id, "reported")]


async def test_a_launch_terminated_before_its_create_frees_its_slot_and_reports_nothing(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    keeper = agent.launcher.keeper = GatedKeeper()
    launch = launch_of(location="loc", job="nightly")
    first = asyncio.create_task(agent.deliver(launch))
    await asyncio.wait_for(keeper.asked.wait(), 30)
    second = asyncio.create_task(agent.deliver(launch))  # a redelivery, while it launches
    [launching] = agent.slots.in_flight()
    assert (launching.container_id, launching.state) == (None, "launching")

    terminated = await agent.deliver(terminate_of(launch))
    keeper.answer.set()
    deliveries = await asyncio.wait_for(asyncio.gather(first, second), 30)
    assert [d.settlements for d in (terminated, *deliveries)] == [["ack"]] * 3
    assert engine.containers == {}
    assert agent.events() == []
    assert (agent.slots.free(), agent.slots.prefetch()) == (2, 2)
    assert agent.slots.in_flight() == ()


async def test_a_launch_terminated_while_its_create_was_sent_is_never_started(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    engine.stop_answering()
    launch = launch_of()
    handling = asyncio.create_task(agent.deliver(launch))
    # The slot is taken and the create sent in one step: from here the create may have
    # landed although the call failed, so the launch is not dropped at once.
    await until(lambda: agent.slots.free() == 1, what="the launch holds a slot")
    # Its claim was granted before the stop came (a cancel after the grant): the stop, which
    # came last, wins.
    claim = agent.launcher.claims.open((launch.run_id, 1))
    await until(lambda: claim.done() and claim.result() is True, what="the claim granted")

    terminated = await agent.deliver(terminate_of(launch, grace_s=3))
    assert terminated.settlements == ["ack"]
    engine.answer_again()
    delivery = await asyncio.wait_for(handling, 30)
    assert delivery.settlements == ["ack"]
    # The container, created, was removed unstarted; nothing to report, the slot free.
    assert containers_of(engine, launch.run_id) == []
    assert agent.of_run(launch.run_id) == []  # no RunLaunched, no RunStarted
    assert agent.slots.free() == 2


async def test_a_terminate_for_a_running_attempt_still_stops_it(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of()
    await agent.deliver(launch)
    container = only_container(engine)
    engine.handles_sigterm(container.id, 143)
    terminated = await agent.deliver(terminate_of(launch, grace_s=10))
    assert terminated.settlements == ["ack"]
    final = await agent.reported(launch.run_id)
    assert isinstance(final, RunFailed)
    assert (final.reason, final.exit_code, final.message) == (
        FailureReason.UNEXPECTED_TERMINATION,
        143,
        "terminated: canceled",
    )
    await until(lambda: agent.slots.free() == 2, what="the slot freed")
    # The exit frees the slot at once; the container goes once its report is out.
    await until(lambda: engine.containers == {}, what="the container removed")
    assert [s.state for s in agent.slots.in_flight()] == ["reported"]
    # Reported as finished, not fenced: a redelivered LaunchRun of it is acked, not run.
    assert agent.slots.fenced((launch.run_id, 1)) is None
    assert (await agent.deliver(launch)).settlements == ["ack"]
    assert engine.containers == {}


async def test_a_stop_during_a_drain_is_retried_while_docker_does_not_answer(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """A drain stops new work, not the stops asked for: one that meets a Docker blip is
    tried again until it holds (before, it gave up at once and the container ran on)."""
    agent = await agent_on()
    launch = launch_of()
    await agent.deliver(launch)
    container = only_container(engine)
    agent.stopping.set()  # draining: the control queue is still consumed
    engine.stop_answering()
    stopping = asyncio.create_task(
        agent.deliver(terminate_of(launch, failure_reason=FailureReason.AGENT_LOST))
    )
    await asyncio.sleep(0.6)  # a first try, and its retry, failed
    assert not stopping.done()  # still trying: not given up, not acked
    engine.answer_again()
    terminated = await asyncio.wait_for(stopping, 30)
    assert terminated.settlements == ["ack"]
    assert container.status == "exited"
    final = await agent.reported(launch.run_id)
    assert isinstance(final, RunFailed) and final.reason == FailureReason.AGENT_LOST


async def test_a_launch_whose_report_the_broker_refuses_is_told_until_taken_then_acked(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """The broker refuses the RunLaunched (a nack): the container runs, so the launch is
    told again until the broker takes it, then acked; a stop that comes meanwhile is carried
    out and its end reported (before, the report waited for ever on a launch never marked
    done, and the launch stayed unacked)."""
    agent = await agent_on()
    launch = launch_of()
    agent.publisher.failure = BrokerRefused("publish refused")
    agent.publisher.answerers.clear()  # the claim is answered by hand
    handling = asyncio.create_task(agent.deliver(launch))
    await until(lambda: engine.containers, what="the container created")
    agent.publisher.failure = None
    agent.launcher.claims.answer((launch.run_id, 1), True)
    agent.publisher.failure = BrokerRefused("publish refused")
    await until(lambda: only_container(engine).status == "running", what="started")
    await asyncio.sleep(0.2)
    assert not handling.done()  # told again and again, not given up
    agent.publisher.failure = None
    delivery = await asyncio.wait_for(handling, 30)
    assert delivery.settlements == ["ack"]
    assert agent.of_run(launch.run_id)[:2] == ["RunLaunched", "RunStarted"]
    terminated = await agent.deliver(terminate_of(launch))
    assert terminated.settlements == ["ack"]
    final = await agent.reported(launch.run_id)
    assert isinstance(final, RunFailed) and final.message == "terminated: canceled"


async def test_a_redelivered_launch_failing_after_the_run_ended_reports_no_failure(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """A second delivery of an attempt re-reports its launch; when that fails after the
    attempt's success was reported, no RunFailed contradicts it."""
    agent = await agent_on()
    launch = launch_of()
    await agent.deliver(launch)
    container = only_container(engine)
    gate = asyncio.Event()

    async def launched_then_broker_gone(*_: Any) -> None:
        await gate.wait()
        raise BrokerUnavailable("the broker went away")

    agent.reporter.launched = launched_then_broker_gone  # type: ignore[method-assign]
    again = asyncio.create_task(agent.deliver(launch))
    await asyncio.sleep(0)
    engine.exit(container.id, 0)
    await agent.reported(launch.run_id)
    await until(lambda: agent.slots.finished((launch.run_id, 1)), what="the attempt released")
    gate.set()
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(again, 30)
    ends = [type(e).__name__ for e in agent.events() if isinstance(e, RunFailed | RunSucceeded)]
    assert ends == ["RunSucceeded"]
