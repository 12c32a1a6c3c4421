"""Hostile and unusual input against the agent: each case leaves no stuck slot, no stuck run
and no secret in the clear.

The launcher, reporter, watcher and slots are the real ones, wired by ``AgentUnderTest``;
only the engine and the broker are fakes (``tests/fakes``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from hd_sdk.frames import encode_frame
from schemas import (
    LaunchRun,
    RunClaimed,
    RunSucceeded,
    TerminateRun,
    encode,
    event_decoder,
    instruction_decoder,
)
from schemas.bounds import MAX_TEXT
from tests.fakes.clock import until
from tests.fakes.publisher import Published
from tests.fakes.runtime import RUN_IMAGE, FakeEngine
from tests.unit.test_agent_launch import AgentUnderTest, Factory, launch_of, only_container
from transport.errors import BrokerUnavailable
from worker_agent.containers import (
    LABEL_AGENT,
    LABEL_ATTEMPT,
    LABEL_MANAGED_BY,
    LABEL_RUN,
    MANAGED_BY,
)
from worker_agent.locations import LocationKeeper
from worker_agent.logs import LineBatcher
from worker_agent.secrets import Redactor

pytestmark = pytest.mark.unit

SLEEP = ("sleep", "3600")


def decodable(event: Any) -> None:
    """What the agent publishes must pass the control plane's own decoder; if it does not,
    the status consumer dead-letters it and the run never learns how its attempt ended."""
    event_decoder().decode(encode(event))


# ---------------------------------------------- a terminate reason at its bound


async def test_a_terminate_reason_at_its_bound_still_yields_a_decodable_final_event(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """TerminateRun.reason may hold MAX_TEXT characters; the final RunFailed says
    "terminated: " + reason, 12 characters past what RunFailed.message takes."""
    agent = await agent_on()
    launch = launch_of()
    await agent.deliver(launch)
    terminate = TerminateRun(run_id=launch.run_id, attempt=1, reason="x" * MAX_TEXT, grace_s=0)
    instruction_decoder().decode(encode(terminate))  # the instruction is within the contract
    await agent.deliver(terminate)
    final = await agent.reported(launch.run_id)
    decodable(final)


# ---------------------------------------------- a duplicate delivery of a failing launch


@pytest.mark.parametrize(
    "kw",
    [{"image": "example.invalid/nothing:here"}, {"command": ("no-such-executable",)}],
    ids=["image missing", "start fails"],
)
async def test_a_duplicate_delivery_of_a_launch_that_fails_is_settled_too(
    engine: FakeEngine, agent_on: Factory, kw: dict[str, Any]
) -> None:
    """Two copies of one LaunchRun in flight (the relay published it twice): the second
    waits on the first's ``launched`` event, which the failure path never sets; it stays
    unacked for the agent's whole life, taking one of the broker's prefetch slots."""
    agent = await agent_on()
    launch = launch_of(**kw)
    first, second = await asyncio.wait_for(
        asyncio.gather(agent.deliver(launch), agent.deliver(launch)), 5
    )
    assert first.settlements == ["ack"]
    assert second.settlements == ["ack"]


# ---------------------------------------------- a job without a location


async def test_a_job_launch_without_a_location_does_not_hold_a_slot_forever(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """``job`` set and ``location`` None can never launch: the keeper answers "location None
    is not kept by this agent" (LocationUnavailable), retried every 30 s for ever."""
    agent = await agent_on()
    servers: Any = None
    connection: Any = None
    agent.launcher.keeper = LocationKeeper(servers, connection, agent.publisher, "a1", ("default",))
    launch = LaunchRun(run_id=uuid.uuid4(), attempt=1, image=RUN_IMAGE, job="j", location=None)
    delivery = await asyncio.wait_for(agent.deliver(launch), 30)
    assert delivery.settlements == ["ack"]
    assert agent.slots.free() == 2


# ---------------------------------------------- malformed labels on adoption


@pytest.mark.parametrize(
    "labels",
    [
        {LABEL_RUN: "not-a-uuid", LABEL_ATTEMPT: "1"},
        {LABEL_RUN: str(uuid.uuid4()), LABEL_ATTEMPT: "one"},
    ],
    ids=["run label", "attempt label"],
)
async def test_a_container_with_malformed_labels_does_not_kill_the_watcher(
    engine: FakeEngine, labels: dict[str, str]
) -> None:
    """A container with this agent's labels whose run id or attempt does not parse (made
    by hand, by another tool) makes adoption raise ValueError: the watcher component dies,
    the agent exits 1, and does so again at every start (a restart loop)."""
    engine.create(
        RUN_IMAGE, SLEEP, "stray", {LABEL_MANAGED_BY: MANAGED_BY, LABEL_AGENT: "a1", **labels}, {}
    )
    agent = AgentUnderTest(engine)
    watching = asyncio.create_task(agent.watcher.run())
    try:
        await until(lambda: agent.watcher.connected.is_set() or watching.done(), what="adoption")
        assert not watching.done(), f"the watcher died: {watching.exception()!r}"
    finally:
        agent.watcher.close()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)


# ---------------------------------------------- an exit code beyond the contract


async def test_an_exit_code_beyond_the_contract_still_yields_a_decodable_final_event(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """Heartbeats list such a code as unknown (``slots._exit_code``); the final event
    carries it as it is, and RunFailed.exit_code takes -1..255 only."""
    agent = await agent_on()
    launch = launch_of()
    await agent.deliver(launch)
    engine.exit(only_container(engine).id, 3221225477)
    final = await agent.reported(launch.run_id)
    decodable(final)


# ---------------------------------------------- an exit before bind, with the launch report lost


async def test_a_run_that_exits_during_its_start_is_reported_even_when_its_launch_report_failed(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """The container exits before the launcher bound it (its exit is kept as "unbound"),
    then RunLaunched is not confirmed: ``_launch`` returns before looking at the unbound
    exit, and the redelivery's path (``_hold_slot``) never looks either. The attempt holds
    its slot as "running" and its end is never reported."""
    agent = await agent_on()
    launch = launch_of(command=SLEEP)
    start = agent.runtime.start

    async def start_then_exit(info: Any) -> Any:
        started = await start(info)
        engine.exit(info.id, 0)  # a process over within a millisecond
        await until(lambda: info.id in agent.reporter._unbound_exits, what="the exit seen")
        return started

    agent.runtime.start = start_then_exit  # type: ignore[method-assign]

    def fail_after_the_claim(published: Published) -> None:
        if isinstance(published.message, RunClaimed):  # granted; what follows is lost
            agent.publisher.failure = BrokerUnavailable("not confirmed in time")

    agent.publisher.answerers.append(fail_after_the_claim)
    first = await agent.deliver(launch)
    assert first.settlements == []
    agent.publisher.answerers.remove(fail_after_the_claim)
    agent.publisher.failure = None
    again = await agent.deliver(launch)  # the broker's redelivery
    assert again.settlements == ["ack"]
    final = await agent.reported(launch.run_id)
    assert isinstance(final, RunSucceeded)
    await until(lambda: agent.slots.free() == 2, what="the slot freed")


# ---------------------------------------------- a secret cut in a progress frame's text


@pytest.mark.parametrize("field,room", [("step", 200), ("message", 4096)])
def test_a_secret_at_the_cut_of_a_progress_text_is_not_left_half_visible(
    field: str, room: int
) -> None:
    """The SDK writes frames with JSON's ASCII escapes, so a non-ASCII (or quoted) secret is
    caught only in the decoded strings, and those are cut (``progress_text``) before they
    are redacted (``LineBatcher._redacted``): the part before the cut travels."""
    secret = "pässwörd-7f3a9c1e"
    text = "x" * (room - 8) + secret
    batcher = LineBatcher(redact=Redactor([secret]))
    event = "log" if field == "message" else "step_started"
    batcher.feed(encode_frame(event, **{field: text}) + "\n")
    [item] = batcher.take_progress()
    shown = getattr(item, field)
    assert secret[:5] not in shown, shown[-20:]


# ---------------------------------------------- a terminate delivered twice


async def test_a_terminate_delivered_twice_stops_its_container_once(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """Each stop holds one of the engine's threads for as long as its grace: a TerminateRun
    that comes again while the container is being stopped adds no stop, unless it gives a
    shorter grace."""
    agent = await agent_on()
    launch = launch_of(command=SLEEP)
    await agent.deliver(launch)
    agent.runtime.stop_gate = gate = asyncio.Event()
    terminate = TerminateRun(run_id=launch.run_id, attempt=1, reason="canceled", grace_s=30)
    first = asyncio.create_task(agent.deliver(terminate))
    await until(lambda: len(agent.runtime.stops) == 1)
    again = await asyncio.wait_for(agent.deliver(terminate), 30)
    assert again.settlements == ["ack"] and len(agent.runtime.stops) == 1
    sooner = TerminateRun(run_id=launch.run_id, attempt=1, reason="now", grace_s=0)
    third = asyncio.create_task(agent.deliver(sooner))
    await until(lambda: len(agent.runtime.stops) == 2)
    gate.set()
    assert [d.settlements for d in await asyncio.gather(first, third)] == [["ack"], ["ack"]]
    container = only_container(engine)
    assert agent.runtime.stops == [(container.id, 30), (container.id, 0)]
    decodable(await agent.reported(launch.run_id))
