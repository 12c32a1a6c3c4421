"""The agent's launch, adoption and finish, on the in-memory engine and publisher.

The launcher, reporter, watcher and slots are the real ones, wired as the agent wires them;
only the engine and the broker are fakes (``tests/fakes``), held to the real ones by the
contract tests.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from schemas import (
    FailureReason,
    Instruction,
    LaunchGranted,
    LaunchRun,
    Message,
    RunClaimed,
    RunFailed,
    RunLaunched,
    RunLog,
    RunStarted,
    RunSucceeded,
    TerminateRun,
    encode,
    instruction_decoder,
)
from schemas.topology import STATUS_EXCHANGE, event_routing_key
from tests.fakes.broker import FakeDelivery
from tests.fakes.clock import ManualClock, until
from tests.fakes.publisher import FakePublisher, Published
from tests.fakes.runtime import RUN_IMAGE, FakeContainer, FakeEngine
from transport.delivery import Delivery
from transport.errors import BrokerUnavailable
from worker_agent.containers import (
    LABEL_AGENT,
    LABEL_ATTEMPT,
    LABEL_MANAGED_BY,
    LABEL_RUN,
    MANAGED_BY,
    container_name,
)
from worker_agent.launcher import Launcher
from worker_agent.progress import FRAME_PREFIX
from worker_agent.reporter import Reporter
from worker_agent.settings import AgentSettings
from worker_agent.slots import Slots
from worker_agent.watcher import ContainerWatcher

pytestmark = pytest.mark.unit

SLEEP = ("sleep", "3600")


class AgentUnderTest:
    """The agent's launch-side components over a fake engine and publisher (no broker
    connection, no heartbeat, no location keeper): what ``agent._Parts`` wires."""

    def __init__(
        self,
        engine: FakeEngine,
        agent_id: str = "a1",
        max_concurrent: int = 2,
        **declared: Any,
    ) -> None:
        """``declared``: the capacity the agent declares (``cpus``, ``memory_mb``, ``gpus``),
        or other settings."""
        self.engine = engine
        self.clock = ManualClock()
        self.settings = AgentSettings(
            amqp_url="amqp://unused/",
            agent_id=agent_id,
            max_concurrent=max_concurrent,
            **{"log_batch_interval_s": 0.02, "output_tail_lines": 5, **declared},
        )
        self.runtime = engine.runtime(agent_id)
        self.publisher = FakePublisher()
        self.slots = Slots(
            max_concurrent,
            reported_for_s=60.0,
            clock=self.clock,
            capacity=self.settings.capacity,
        )
        #: Set by a drain or a shutdown; ``shutting_down`` by the shutdown only.
        self.stopping = asyncio.Event()
        self.shutting_down = asyncio.Event()
        self.reporter = Reporter(self.settings, self.runtime, self.slots, self.publisher)
        self.launcher = Launcher(
            self.settings,
            self.runtime,
            self.slots,
            self.reporter,
            self.stopping,
            self.shutting_down,
        )
        self.watcher = ContainerWatcher(
            self.runtime, self.reporter.on_exit, self.launcher.adopt, self.reporter.on_ready
        )
        self._watching: asyncio.Task[None] | None = None
        #: Claims answered with a TerminateRun, as the control plane answers a claimant when
        #: another agent holds the attempt; every other claim is granted.
        self.refused: set[tuple[uuid.UUID, int]] = set()
        #: Claims left unanswered (a test answers them itself, or never).
        self.unanswered = False
        self._answers: set[asyncio.Task[Any]] = set()
        self.publisher.answerers.append(self._answer_claim)

    def _answer_claim(self, published: Published) -> None:
        """The control plane's answer to a claim, delivered as the control queue would."""
        claim = published.message
        if not isinstance(claim, RunClaimed) or self.unanswered:
            return
        answer: Instruction
        if (claim.run_id, claim.attempt) in self.refused:
            answer = TerminateRun(
                run_id=claim.run_id, attempt=claim.attempt, reason="claim refused", grace_s=0
            )
        else:
            answer = LaunchGranted(
                run_id=claim.run_id, attempt=claim.attempt, agent_id=claim.agent_id
            )
        task = asyncio.create_task(self.deliver(answer))
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def start(self) -> None:
        """Watch Docker (which adopts what this agent ran before), as the agent starts."""
        self._watching = asyncio.create_task(self.watcher.run())
        await until(self.watcher.connected.is_set, what="the watcher connected")

    async def deliver(self, instruction: Instruction) -> FakeDelivery:
        delivery = FakeDelivery(encode(instruction), message_id=str(instruction.message_id))
        handled: Delivery[Any] = Delivery(instruction, delivery)  # type: ignore[arg-type]
        await self.launcher.handle(handled)
        return delivery

    def events(self, kind: type[Message] | None = None) -> list[Any]:
        """What the agent published, of ``kind``; without one, all but its claims (which
        the claim tests look at by name)."""
        return [
            e
            for e in self.publisher.events
            if (kind is None and not isinstance(e, RunClaimed)) or (kind and isinstance(e, kind))
        ]

    def of_run(self, run_id: uuid.UUID) -> list[str]:
        """The kinds of the run's events, but for its claims."""
        return [type(e).__name__ for e in self.events() if getattr(e, "run_id", None) == run_id]

    async def reported(self, run_id: uuid.UUID) -> RunSucceeded | RunFailed:
        """Wait for the final event of the run."""

        def final() -> list[Any]:
            return [
                e
                for e in self.events()
                if isinstance(e, RunSucceeded | RunFailed) and e.run_id == run_id
            ]

        await until(final, what=f"the final event of run {run_id}")
        [event] = final()
        return event  # type: ignore[no-any-return]

    async def close(self) -> None:
        self.stopping.set()
        self.watcher.close()
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        await self.reporter.close()


Factory = Callable[..., Awaitable[AgentUnderTest]]


def launch_of(
    command: tuple[str, ...] = SLEEP, run_id: uuid.UUID | None = None, attempt: int = 1, **kw: Any
) -> LaunchRun:
    kw.setdefault("image", RUN_IMAGE)
    return LaunchRun(run_id=run_id or uuid.uuid4(), attempt=attempt, command=command, **kw)


def launches() -> float:
    return REGISTRY.get_sample_value("hd_launches_total") or 0.0


def only_container(engine: FakeEngine) -> FakeContainer:
    [container] = engine.containers.values()
    return container


# ------------------------------------------------------------------------- launching


async def test_a_launch_starts_one_labelled_container_reports_it_then_acks(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of(env={"MODE": "fast"})
    before = launches()
    delivery = await agent.deliver(launch)

    container = only_container(engine)
    assert container.name == container_name(launch.run_id, 1)
    assert container.labels == {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_AGENT: "a1",
        LABEL_RUN: str(launch.run_id),
        LABEL_ATTEMPT: "1",
    }
    assert (container.env, container.command, container.status) == (
        {"MODE": "fast"},
        SLEEP,
        "running",
    )
    assert delivery.settlements == ["ack"]
    launched, started = agent.events()
    assert launched == RunLaunched(
        run_id=launch.run_id,
        attempt=1,
        agent_id="a1",
        container_id=container.id,
        container_name=container.name,
        message_id=launched.message_id,
        sent_at=launched.sent_at,
    )
    assert isinstance(started, RunStarted) and started.container_id == container.id
    for published in agent.publisher.to(STATUS_EXCHANGE):
        assert published.message is not None
        assert published.routing_key == event_routing_key(published.message)
    assert launches() == before + 1
    assert agent.slots.free() == 1
    [held] = agent.slots.in_flight()
    assert (held.run_id, held.container_id, held.state) == (launch.run_id, container.id, "running")


async def test_a_run_with_a_ready_check_is_reported_started_once_it_passes(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of(ready_check=("true",))
    delivery = await agent.deliver(launch)
    assert delivery.settlements == ["ack"]
    assert agent.of_run(launch.run_id) == ["RunLaunched"]
    engine.check_health()  # the check's interval passed
    await until(lambda: agent.events(RunStarted), what="RunStarted")
    assert agent.of_run(launch.run_id) == ["RunLaunched", "RunStarted"]


async def test_a_launch_is_acked_only_once_its_report_is_confirmed(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of()

    def fail_after_the_claim(published: Published) -> None:
        if isinstance(published.message, RunClaimed):  # granted; what follows is lost
            agent.publisher.failure = BrokerUnavailable("not confirmed in time")

    agent.publisher.answerers.append(fail_after_the_claim)
    first = await agent.deliver(launch)
    assert first.settlements == []  # left to the broker to deliver again
    assert agent.events() == []
    container = only_container(engine)
    agent.publisher.answerers.remove(fail_after_the_claim)
    agent.publisher.failure = None
    again = await agent.deliver(launch)  # the redelivery adopts the container
    assert again.settlements == ["ack"]
    assert only_container(engine) is container
    assert [e.container_id for e in agent.events(RunLaunched)] == [container.id]


async def test_a_second_delivery_of_a_running_attempt_is_reported_again_not_run_again(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of()
    before = launches()
    first, second = await asyncio.gather(agent.deliver(launch), agent.deliver(launch))
    third = await agent.deliver(launch)
    container = only_container(engine)
    assert [d.settlements for d in (first, second, third)] == [["ack"]] * 3
    assert {e.container_id for e in agent.events(RunLaunched)} == {container.id}
    assert len(agent.events(RunLaunched)) == 3
    assert launches() == before + 1
    assert agent.slots.free() == 1


async def test_a_container_created_by_an_earlier_life_is_adopted_and_started_not_doubled(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of()
    # A create that was in flight when the previous process died lands after this one
    # listed its containers: the container exists, created, never started.
    earlier = engine.create(
        RUN_IMAGE,
        SLEEP,
        container_name(launch.run_id, 1),
        engine.runtime("a1").labels_for(launch),
        {},
    )
    before = launches()
    delivery = await agent.deliver(launch)
    assert only_container(engine) is earlier
    assert earlier.status == "running"
    assert delivery.settlements == ["ack"]
    assert [e.container_id for e in agent.events(RunLaunched)] == [earlier.id]
    assert launches() == before  # adopted, not launched


async def test_a_later_attempt_fences_the_earlier_one_which_is_reported_gone(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    run_id = uuid.uuid4()
    await agent.deliver(launch_of(run_id=run_id, attempt=1))
    await agent.deliver(launch_of(run_id=run_id, attempt=2))
    container = only_container(engine)
    assert container.labels[LABEL_ATTEMPT] == "2"
    gone = await agent.reported(run_id)
    assert isinstance(gone, RunFailed)
    assert (gone.attempt, gone.reason) == (1, FailureReason.UNEXPECTED_TERMINATION)
    assert gone.message == "the container disappeared"
    await until(lambda: agent.slots.finished((run_id, 1)), what="attempt 1 released")
    assert [(s.attempt, s.state) for s in agent.slots.in_flight()] == [
        (2, "running"),
        (1, "reported"),
    ]


# ------------------------------------------------------------------ failed launches


async def test_a_missing_image_fails_the_attempt_acks_and_frees_the_slot(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of(image="example.invalid/nothing:here")
    delivery = await agent.deliver(launch)
    assert delivery.settlements == ["ack"]
    [failed] = agent.events()
    assert isinstance(failed, RunFailed)
    assert failed.reason == FailureReason.IMAGE_NOT_FOUND
    assert engine.containers == {}
    assert agent.slots.free() == 2
    assert agent.slots.finished((launch.run_id, 1))


async def test_a_command_that_cannot_start_fails_the_attempt_with_the_reason(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of(command=("no-such-executable",))
    delivery = await agent.deliver(launch)
    assert delivery.settlements == ["ack"]
    [failed] = agent.events()
    assert isinstance(failed, RunFailed)
    assert failed.reason == FailureReason.LAUNCH_ERROR
    assert "executable file not found" in failed.message
    assert agent.slots.free() == 2
    # The container Docker created stays behind, never started.
    assert only_container(engine).status == "created"


async def test_a_launch_waiting_for_the_engine_is_left_unacked_when_the_agent_stops(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    engine.stop_answering()
    handling = asyncio.create_task(agent.deliver(launch_of()))
    await until(lambda: agent.slots.free() == 1, what="the launch holds a slot")
    agent.stopping.set()  # the shutdown begins while the launch waits for Docker
    delivery = await asyncio.wait_for(handling, 30)
    # Neither acked nor nacked: it goes back to its queue when the channel closes, and a
    # nack would count against the queue's delivery limit.
    assert delivery.settlements == []
    assert engine.containers == {}
    assert agent.events() == []
    assert agent.slots.free() == 2
    assert not agent.slots.finished((delivery_run(delivery), 1))


def delivery_run(delivery: FakeDelivery) -> uuid.UUID:
    launch = instruction_decoder().decode(delivery.body)
    assert isinstance(launch, LaunchRun)
    return launch.run_id


# ------------------------------------------------------------------------ finishing


@pytest.mark.parametrize("code", [0, 3])
async def test_an_exit_is_reported_with_its_code_and_output_then_the_container_goes(
    engine: FakeEngine, agent_on: Factory, code: int
) -> None:
    agent = await agent_on()
    launch = launch_of()
    await agent.deliver(launch)
    container = only_container(engine)
    engine.write(container.id, "one\ntwo\n")
    engine.exit(container.id, code)

    final = await agent.reported(launch.run_id)
    if code == 0:
        assert isinstance(final, RunSucceeded)
    else:
        assert isinstance(final, RunFailed)
        assert (final.reason, final.exit_code) == (FailureReason.EXIT_CODE, 3)
        assert final.message == "exited with code 3"
    assert final.output_tail == ("one", "two")
    # The output went out, numbered, before the final event.
    names = agent.of_run(launch.run_id)
    assert names.index("RunLog") < names.index(type(final).__name__)
    [log] = agent.events(RunLog)
    assert (log.first_line, log.lines) == (0, ("one", "two"))
    # Then the container is removed and the slot freed (the slot at the exit, the removal
    # after the report); the attempt is listed as reported.
    await until(lambda: agent.slots.free() == 2, what="the slot freed")
    await until(lambda: engine.containers == {}, what="the container removed")
    [listed] = agent.slots.in_flight()
    assert (listed.state, listed.exit_code) == ("reported", code)
    agent.clock.advance(61)
    assert agent.slots.in_flight() == ()


async def test_an_oom_kill_is_reported_as_such(engine: FakeEngine, agent_on: Factory) -> None:
    agent = await agent_on()
    launch = launch_of(memory_limit_mb=64)
    await agent.deliver(launch)
    engine.exit(only_container(engine).id, 137, oom_killed=True)
    final = await agent.reported(launch.run_id)
    assert isinstance(final, RunFailed)
    assert (final.reason, final.exit_code) == (FailureReason.OOM, 137)


async def test_an_oom_kill_the_engine_records_after_the_exit_is_reported_as_such(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """Under load Docker may handle a container's exit before the kernel's word that it was
    killed for memory: its first inspection says exit code 137, nothing more."""
    agent = await agent_on()
    limited, unlimited = launch_of(memory_limit_mb=64), launch_of()
    for launch in (limited, unlimited):
        await agent.deliver(launch)
    first, second = sorted(
        engine.containers.values(), key=lambda c: c.name != container_name(limited.run_id, 1)
    )
    engine.exit(first.id, 137, oom_killed=True, recorded_late=True)
    engine.exit(second.id, 3)
    final = await agent.reported(limited.run_id)
    assert isinstance(final, RunFailed)
    assert (final.reason, final.exit_code) == (FailureReason.OOM, 137)
    plain = await agent.reported(unlimited.run_id)
    assert isinstance(plain, RunFailed) and plain.reason == FailureReason.EXIT_CODE


async def test_the_output_tail_comes_from_the_output_followed_to_the_exit(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """A run over within its first batch interval has its output read once, after the exit:
    the final event's tail is that read's last lines (frames left out), and the container's
    output is not read a second time."""
    agent = await agent_on(log_batch_interval_s=30.0)
    launch = launch_of()
    await agent.deliver(launch)
    container = only_container(engine)
    frame = FRAME_PREFIX + json.dumps({"event": "step_started", "step": "load"})
    engine.write(container.id, "".join(f"line {n}\n" for n in range(8)) + frame + "\nlast")
    engine.exit(container.id, 0)

    final = await agent.reported(launch.run_id)
    # output_tail_lines=5; the frame went out as progress; "last" had no newline.
    assert final.output_tail == ("line 4", "line 5", "line 6", "line 7", "last")
    assert agent.runtime.tail_reads == 0


async def test_a_short_run_s_output_is_read_once_after_its_exit_not_followed_live(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """Within its first batch interval a container's output is not followed live: a run
    that ends by then has its output read once, finished, and forwarded in full."""
    agent = await agent_on(log_batch_interval_s=30.0)
    launch = launch_of()
    await agent.deliver(launch)
    container = only_container(engine)
    engine.write(container.id, "one\ntwo\n")
    engine.exit(container.id, 0)

    final = await agent.reported(launch.run_id)
    assert final.output_tail == ("one", "two")
    [log] = agent.events(RunLog)
    assert (log.first_line, log.lines) == (0, ("one", "two"))
    assert (engine.follows, engine.live_follows) == (1, 0)


async def test_a_longer_run_s_output_is_followed_live_after_its_first_batch_interval(
    engine: FakeEngine, agent_on: Factory
) -> None:
    """Past its first batch interval a container's output is followed live; its tail is
    read from the engine after the exit."""
    agent = await agent_on(log_batch_interval_s=0.05)
    launch = launch_of()
    await agent.deliver(launch)
    container = only_container(engine)
    engine.write(container.id, "early\n")
    await until(lambda: engine.live_follows == 1, what="the output followed live")
    await until(lambda: agent.events(RunLog), what="the first line forwarded")
    engine.write(container.id, "late\n")
    await until(lambda: len(agent.events(RunLog)) == 2, what="the second line forwarded")
    engine.exit(container.id, 0)
    final = await agent.reported(launch.run_id)
    assert [log.lines for log in agent.events(RunLog)] == [("early",), ("late",)]
    # A live follow may miss a last line without a newline (and ends alike when its
    # connection breaks): the tail is read from the engine.
    assert final.output_tail == ("early", "late")
    assert agent.runtime.tail_reads == 1


async def test_a_finished_attempt_delivered_again_is_acked_and_not_run(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of(command=("sh", "-c", "exit 0"))
    await agent.deliver(launch)
    await agent.reported(launch.run_id)
    await until(lambda: not engine.containers, what="the container removed")
    published = len(agent.publisher.published)
    again = await agent.deliver(launch)
    assert again.settlements == ["ack"]
    assert engine.containers == {}
    assert len(agent.publisher.published) == published


async def test_terminate_stops_the_container_and_reports_the_reason_given(
    engine: FakeEngine, agent_on: Factory
) -> None:
    agent = await agent_on()
    launch = launch_of()
    await agent.deliver(launch)
    terminate = TerminateRun(
        run_id=launch.run_id,
        attempt=1,
        reason="over its time limit",
        grace_s=0,
        failure_reason=FailureReason.MAX_RUNTIME,
    )
    delivery = await agent.deliver(terminate)
    assert delivery.settlements == ["ack"]
    final = await agent.reported(launch.run_id)
    assert isinstance(final, RunFailed)
    assert (final.reason, final.exit_code) == (FailureReason.MAX_RUNTIME, 137)
    assert final.message == "terminated: over its time limit"


# ------------------------------------------------------------------------- adopting


async def test_on_start_the_agent_adopts_its_containers_and_reports_those_that_ended(
    engine: FakeEngine, agent_on: Factory
) -> None:
    # The previous life of agent a1 left three containers; agent a2 has one of its own.
    before = engine.runtime("a1")
    running = launch_of()
    failed = launch_of(command=("sh", "-c", "echo bye; exit 3"))
    succeeded = launch_of(command=("sh", "-c", "exit 0"))
    ids = {}
    for launch in (running, failed, succeeded):
        info, _ = await before.launch(launch)
        ids[launch.run_id] = info.id
    theirs, _ = await engine.runtime("a2").launch(launch_of())
    await until(lambda: engine.get(ids[failed.run_id]).finished, what="the exits")
    await until(lambda: engine.get(ids[succeeded.run_id]).finished, what="the exits")

    # One slot only: adopted containers hold slots even past the limit.
    agent = await agent_on(max_concurrent=1)
    # The exited ones are reported and removed, and give their slots back.
    bad = await agent.reported(failed.run_id)
    assert isinstance(bad, RunFailed)
    assert (bad.exit_code, bad.output_tail) == (3, ("bye",))
    assert isinstance(await agent.reported(succeeded.run_id), RunSucceeded)
    await until(lambda: len(agent.slots.attempts) == 1, what="the exited ones released")
    assert [(a.run_id, a.container_id) for a in agent.slots.attempts.values()] == [
        (running.run_id, ids[running.run_id])
    ]
    for run in (failed, succeeded):
        assert agent.of_run(run.run_id)[0] == "RunLaunched"
    await until(lambda: set(engine.containers) == {ids[running.run_id], theirs.id}, what="gone")
    assert {e.container_id for e in agent.events(RunLaunched)} == set(ids.values())
    assert engine.get(theirs.id).status == "running"  # another agent's: not ours to touch
    assert agent.slots.free() == 0

    # The adopted one is followed to its end like any other.
    engine.exit(ids[running.run_id], 0)
    assert isinstance(await agent.reported(running.run_id), RunSucceeded)
    await until(lambda: agent.slots.free() == 1, what="the slot freed")


async def test_after_a_restart_a_redelivered_launch_of_an_adopted_attempt_is_acked(
    engine: FakeEngine, agent_on: Factory
) -> None:
    launch = launch_of()
    info, _ = await engine.runtime("a1").launch(launch)  # the previous life; never acked
    agent = await agent_on()
    delivery = await agent.deliver(launch)
    assert delivery.settlements == ["ack"]
    assert [c.id for c in engine.containers.values()] == [info.id]
    assert [e.container_id for e in agent.events(RunLaunched)] == [info.id, info.id]
