"""An agent's capacity: it takes a run only while the run fits what it declares.

A run that does not fit yet waits on the agent, unacked and in line (first come, first
served); one that can never fit fails at once with the reason; what a run holds is freed with
its slot (end, cancel, fence, adoption after a restart). The launcher, reporter, watcher and
slots are the real ones; only the engine and the broker are fakes. The Docker options a run
gets (nano-CPUs, GPU device requests) are read from what the fake engine was asked.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from schemas import (
    AgentHeartbeat,
    FailureReason,
    LaunchRun,
    RunFailed,
    TerminateRun,
    encode,
    event_decoder,
)
from schemas.resources import Capacity, Resources, Shortfall
from tests.fakes.clock import until
from tests.fakes.runtime import FakeContainer, FakeEngine
from tests.unit.test_agent_launch import AgentUnderTest, Factory, launch_of
from tests.unit.test_cli import run_agent
from worker_agent.containers import container_name, run_options
from worker_agent.heartbeat import Heartbeat
from worker_agent.settings import AgentConfigError, AgentSettings

pytestmark = pytest.mark.unit

CPU = 1_000_000_000


def container_of(engine: FakeEngine, launch: LaunchRun) -> FakeContainer | None:
    return engine.find(container_name(launch.run_id, launch.attempt))


def running(engine: FakeEngine) -> set[uuid.UUID]:
    """The runs whose containers run now."""
    return {
        uuid.UUID(c.name.removeprefix("hd-run-")[:36])
        for c in engine.containers.values()
        if c.status == "running"
    }


async def waiting(agent: AgentUnderTest, launch: LaunchRun) -> asyncio.Task[Any]:
    """Deliver ``launch`` to an agent that has no room for it: it waits, in line."""
    before = agent.slots.waiting
    handling = asyncio.create_task(agent.deliver(launch))
    await until(lambda: agent.slots.waiting == before + 1, what="the launch waits in line")
    return handling


async def finish(agent: AgentUnderTest, engine: FakeEngine, launch: LaunchRun) -> None:
    """The run's container exits 0; wait until its slot was released."""
    container = container_of(engine, launch)
    assert container is not None
    engine.exit(container.id, 0)
    await agent.reported(launch.run_id)
    await until(lambda: launch.run_id not in {a.run_id for a in agent.slots.attempts.values()})


# ------------------------------------------------------------------------ the rule


def test_what_fits_is_counted_per_dimension_and_none_is_not_counted() -> None:
    two_cpus = Capacity(cpus=2)
    # Memory is not counted there: any memory limit fits.
    assert two_cpus.lacks(Resources.asked(2, 1_000_000, 0)) is None
    short = two_cpus.lacks(Resources.asked(1, None, 0), held=Resources.asked(1.5, None, 0))
    assert short == Shortfall("cpus", asked=CPU, offered=2 * CPU, free=CPU // 2)
    assert (short.asked_words, short.free_words, short.offered_words) == (
        "1 CPU",
        "0.5 CPUs",
        "2 CPUs",
    )
    # GPUs are always counted: an agent that declares none takes no GPU run.
    no_gpu = two_cpus.lacks(Resources.asked(None, None, 1))
    assert no_gpu is not None and (no_gpu.field, no_gpu.offered_words) == ("gpus", "0 GPUs")
    assert Capacity(gpus=2).lacks(Resources.asked(None, None, 2)) is None
    memory = Capacity(memory_mb=100).lacks(Resources.asked(None, 64, 0), Resources(memory_mb=64))
    assert memory is not None and memory.field == "memory_limit_mb"


def test_fractions_of_cpus_add_up_exactly() -> None:
    tenth = Resources.asked(0.1, None, 0)
    held = Resources()
    for _ in range(9):
        held += tenth
    one = Capacity(cpus=1)
    assert one.lacks(tenth, held) is None  # 0.1 * 10 is 1, in nano-CPUs
    assert one.lacks(tenth, held + tenth) is not None


def test_a_run_asking_nothing_fits_even_an_agent_over_its_capacity() -> None:
    # Adopted containers may hold more than the capacity (it was lowered since).
    assert Capacity(cpus=1, gpus=0).lacks(Resources(), Resources(nano_cpus=4 * CPU)) is None


# ---------------------------------------------------------------- Docker's options


async def test_a_run_gets_its_cpus_as_nano_cpus_and_its_gpus_as_a_device_request(
    engine: FakeEngine,
) -> None:
    launch = launch_of(cpus=1.5, gpus=2, memory_limit_mb=64)
    options = run_options(launch)
    assert options["nano_cpus"] == 1_500_000_000
    [request] = options["device_requests"]
    assert (request["Count"], request["Capabilities"]) == (2, [["gpu"]])
    assert options["mem_limit"] == "64m"
    plain = run_options(launch_of())
    assert "nano_cpus" not in plain and "device_requests" not in plain

    # What the engine was asked is what it shows, and what an adopting agent reads back.
    engine.gpus = 2
    info, _ = await engine.runtime("a1").launch(launch)
    container = engine.get(info.id)
    assert container.options["nano_cpus"] == 1_500_000_000
    [shown] = container.attrs()["HostConfig"]["DeviceRequests"]
    assert (shown["Count"], shown["Capabilities"]) == (2, [["gpu"]])
    assert info.resources == Resources.asked(1.5, 64, 2)


# --------------------------------------------------------------------- waiting


async def test_a_run_that_does_not_fit_the_free_cpus_waits_unacked_then_starts(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on(max_concurrent=4, cpus=1)
    first, second = launch_of(cpus=1), launch_of(cpus=1)
    assert (await agent.deliver(first)).settlements == ["ack"]
    handling = await waiting(agent, second)

    # Slots are free, but the CPUs are not: nothing more is taken meanwhile.
    assert agent.slots.free() == 3
    assert agent.slots.prefetch() == 0
    assert running(engine) == {first.run_id}

    await finish(agent, engine, first)
    delivery = await asyncio.wait_for(handling, 30)
    # Acked once started, never nacked: a requeue would count against the delivery limit.
    assert delivery.settlements == ["ack"]
    assert running(engine) == {second.run_id}
    assert agent.slots.held() == Resources(nano_cpus=CPU)
    assert agent.slots.prefetch() == 3


async def test_waiting_runs_start_first_come_first_served(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on(max_concurrent=4, cpus=2)
    small, big, after, nothing = (
        launch_of(cpus=1),
        launch_of(cpus=2),
        launch_of(cpus=1),
        launch_of(),
    )
    await agent.deliver(small)
    big_handling = await waiting(agent, big)
    # One CPU is free, enough for these two, but the big run came first.
    after_handling = await waiting(agent, after)
    nothing_handling = await waiting(agent, nothing)
    assert running(engine) == {small.run_id}

    await finish(agent, engine, small)
    assert (await asyncio.wait_for(big_handling, 30)).settlements == ["ack"]
    assert running(engine) == {big.run_id}
    assert agent.slots.waiting == 2  # the 1-CPU run waits for the big one's CPUs

    await finish(agent, engine, big)
    for handling in (after_handling, nothing_handling):
        assert (await asyncio.wait_for(handling, 30)).settlements == ["ack"]
    assert running(engine) == {after.run_id, nothing.run_id}


async def test_memory_limits_are_counted_against_the_declared_memory(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on(max_concurrent=4, memory_mb=100)
    first, second = launch_of(memory_limit_mb=64), launch_of(memory_limit_mb=64)
    await agent.deliver(first)
    handling = await waiting(agent, second)
    await finish(agent, engine, first)
    assert (await asyncio.wait_for(handling, 30)).settlements == ["ack"]
    assert agent.slots.held() == Resources(memory_mb=64)


async def test_a_run_waiting_for_room_goes_back_to_its_queue_when_the_agent_stops(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on(max_concurrent=4, cpus=1)
    await agent.deliver(launch_of(cpus=1))
    handling = await waiting(agent, launch_of(cpus=1))
    agent.stopping.set()
    # Back to its queue at once, for another agent (a drain keeps the channel open).
    assert (await asyncio.wait_for(handling, 30)).settlements == ["nack(requeue=True)"]
    assert agent.slots.waiting == 0
    assert len(engine.containers) == 1


# ----------------------------------------------------------------- never fitting


async def test_a_run_asking_more_than_the_agent_offers_in_all_fails_at_once(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on(max_concurrent=4, cpus=2)
    busy = launch_of(cpus=2)
    await agent.deliver(busy)
    queued = await waiting(agent, launch_of(cpus=1))

    huge = launch_of(cpus=4)
    delivery = await asyncio.wait_for(agent.deliver(huge), 30)
    # Settled while the agent is busy: it did not wait in line, nor hold the line up.
    assert delivery.settlements == ["ack"]
    failed = await agent.reported(huge.run_id)
    assert isinstance(failed, RunFailed)
    assert failed.reason == FailureReason.LAUNCH_ERROR
    assert failed.message == (
        "the run asks for 4 CPUs; agent a1 offers 2 CPUs in all (--cpus), so it can never run there"
    )
    assert container_of(engine, huge) is None
    assert agent.slots.waiting == 1
    # Redelivered, it is acked as done, not run.
    assert (await agent.deliver(huge)).settlements == ["ack"]

    await finish(agent, engine, busy)
    assert (await asyncio.wait_for(queued, 30)).settlements == ["ack"]


async def test_a_gpu_run_on_an_agent_that_declares_no_gpu_fails_at_once(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of(gpus=1)
    assert (await agent.deliver(launch)).settlements == ["ack"]
    failed = await agent.reported(launch.run_id)
    assert isinstance(failed, RunFailed)
    assert failed.message.startswith(
        "the run asks for 1 GPU; agent a1 offers 0 GPUs in all (--gpus)"
    )
    assert engine.containers == {}


async def test_a_gpu_run_asks_the_engine_for_gpus_and_fails_clearly_without_a_gpu_runtime(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on(gpus=1)
    launch = launch_of(gpus=1)
    assert (await agent.deliver(launch)).settlements == ["ack"]
    container = container_of(engine, launch)
    assert container is not None
    [request] = container.attrs()["HostConfig"]["DeviceRequests"]
    assert (request["Count"], request["Capabilities"]) == (1, [["gpu"]])
    failed = await agent.reported(launch.run_id)
    assert isinstance(failed, RunFailed)
    assert failed.reason == FailureReason.LAUNCH_ERROR
    assert 'could not select device driver "" with capabilities: [[gpu]]' in failed.message
    # Its GPU is free again.
    assert agent.slots.held() == Resources()
    assert agent.slots.free() == 2


async def test_gpus_are_held_one_run_at_a_time_on_a_one_gpu_agent(
    engine: FakeEngine, agent_on: Factory
) -> None:
    engine.gpus = 1
    agent = await agent_on(max_concurrent=4, gpus=1)
    first, second = launch_of(gpus=1), launch_of(gpus=1)
    await agent.deliver(first)
    handling = await waiting(agent, second)
    assert agent.slots.held() == Resources(gpus=1)
    await finish(agent, engine, first)
    assert (await asyncio.wait_for(handling, 30)).settlements == ["ack"]
    assert running(engine) == {second.run_id}


# ------------------------------------------------------------------- releasing


async def test_a_terminated_run_frees_its_cpus_for_the_one_waiting(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on(max_concurrent=4, cpus=1)
    first, second = launch_of(cpus=1), launch_of(cpus=1)
    await agent.deliver(first)
    handling = await waiting(agent, second)
    terminate = TerminateRun(run_id=first.run_id, attempt=1, reason="canceled", grace_s=0)
    assert (await agent.deliver(terminate)).settlements == ["ack"]
    assert (await asyncio.wait_for(handling, 30)).settlements == ["ack"]
    assert running(engine) == {second.run_id}
    assert agent.slots.held() == Resources(nano_cpus=CPU)


async def test_a_waiting_run_that_is_fenced_leaves_the_line_to_the_next(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on(max_concurrent=4, cpus=1)
    busy, fenced, next_one = launch_of(cpus=1), launch_of(cpus=1), launch_of(cpus=1)
    await agent.deliver(busy)
    fenced_handling = await waiting(agent, fenced)
    next_handling = await waiting(agent, next_one)

    await agent.deliver(TerminateRun(run_id=fenced.run_id, attempt=1, reason="canceled"))
    assert (await asyncio.wait_for(fenced_handling, 30)).settlements == ["ack"]
    assert agent.slots.waiting == 1
    await finish(agent, engine, busy)
    assert (await asyncio.wait_for(next_handling, 30)).settlements == ["ack"]
    assert running(engine) == {next_one.run_id}
    assert container_of(engine, fenced) is None


async def test_after_a_restart_adopted_containers_hold_what_they_were_created_with(
    engine: FakeEngine, agent_on: Factory
) -> None:
    # The previous life of a1 started a 1-CPU run; this one declares 1 CPU.
    earlier = launch_of(cpus=1, memory_limit_mb=64)
    await engine.runtime("a1").launch(earlier)
    agent = await agent_on(max_concurrent=4, cpus=1)
    assert agent.slots.held() == Resources(nano_cpus=CPU, memory_mb=64)

    later = launch_of(cpus=1)
    handling = await waiting(agent, later)
    await finish(agent, engine, earlier)
    assert (await asyncio.wait_for(handling, 30)).settlements == ["ack"]
    assert running(engine) == {later.run_id}


# -------------------------------------------------------- declaring the capacity


def test_the_capacity_comes_from_the_environment_or_the_options() -> None:
    env = {
        "HD_AMQP_URL": "amqp://x/",
        "HD_AGENT_CPUS": "2.5",
        "HD_AGENT_MEMORY_MB": "4096",
        "HD_AGENT_GPUS": "1",
    }
    assert AgentSettings.from_env(env).capacity == Capacity(cpus=2.5, memory_mb=4096, gpus=1)
    assert AgentSettings.from_env(env, cpus=8.0).capacity.cpus == 8.0
    # By default CPUs and memory are not counted, and no GPU is offered.
    assert AgentSettings.from_env({"HD_AMQP_URL": "amqp://x/"}).capacity == Capacity()


@pytest.mark.parametrize(
    ("declared", "words"),
    [
        ({"HD_AGENT_CPUS": "lots"}, "HD_AGENT_CPUS='lots' is not a number"),
        ({"HD_AGENT_CPUS": "0"}, "--cpus 0 is out of range"),
        ({"HD_AGENT_CPUS": "5000"}, "--cpus 5000 is out of range"),
        ({"HD_AGENT_MEMORY_MB": "1"}, "--memory-mb 1 is out of range"),
        ({"HD_AGENT_GPUS": "-1"}, "--gpus -1 is out of range"),
        ({"HD_AGENT_GPUS": "0.5"}, "HD_AGENT_GPUS='0.5' is not a number"),
    ],
)
def test_a_bad_capacity_is_refused_with_the_reason(declared: dict[str, str], words: str) -> None:
    with pytest.raises(AgentConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        AgentSettings.from_env({"HD_AMQP_URL": "amqp://x/", **declared})


def test_worker_agent_run_explains_a_bad_capacity() -> None:
    result = run_agent("run", "--amqp-url", "amqp://x/", "--cpus", "0")
    assert result.returncode == 2
    assert "--cpus 0 is out of range" in result.stderr
    result = run_agent("run", "--amqp-url", "amqp://x/", "--gpus", "many")
    assert result.returncode == 2
    assert "--gpus" in result.stderr


def test_the_heartbeat_declares_the_capacity() -> None:
    heartbeat = Heartbeat(
        None,  # type: ignore[arg-type]  # only the message is built
        "a1",
        ("default",),
        4,
        2.0,
        lambda: (),
        capacity=Capacity(cpus=1.5, memory_mb=2048, gpus=1),
    )
    beat = event_decoder().decode(encode(heartbeat.message()))
    assert isinstance(beat, AgentHeartbeat)
    assert (beat.cpus, beat.memory_mb, beat.gpus) == (1.5, 2048, 1)
