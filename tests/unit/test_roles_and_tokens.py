"""Role identities and submitter tokens: the permission patterns their broker users get, held
against what the processes declare (on the in-memory broker) and publish, and the intake's
rules for a submission's sender."""

from __future__ import annotations

import re
import uuid

import pytest

from dispatcher.broker_users import Permissions
from dispatcher.roles import control_plane_permissions, monitor_permissions, web_permissions
from dispatcher.submitters import Limits, Registry, limits_problem, sender_problem
from dispatcher.tokens import submitter_permissions
from schemas import (
    AgentHeartbeat,
    FailureReason,
    LocationLoaded,
    RunAccepted,
    RunEnded,
    RunFailed,
    RunRejected,
    RunRetrying,
    RunStarted,
    SubmitRun,
)
from schemas.topology import (
    CONTROL_EXCHANGE,
    CONTROL_SOURCE,
    INSTRUCTIONS_EXCHANGE,
    MONITOR_SOURCE,
    STATUS_EXCHANGE,
    event_routing_key,
    follow_pattern,
)
from tests.fakes.broker import FakeBroker
from transport.topology import declare_monitor_queue, declare_target, declare_topology

pytestmark = pytest.mark.unit

RUN = uuid.uuid4()
PRIVATE = ["amq_" + uuid.uuid4().hex, "amq.gen-Xy_1-z"]
EVERY_EXCHANGE = [
    "hd.requests",
    "hd.instructions",
    "hd.control",
    "hd.locations",
    "hd.status",
    "hd.dead-letters",
    "amq.default",
    "amq.topic",
]


def matches(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern, name) is not None


def agent_keys(agent: str = "a-1") -> list[str]:
    return [
        event_routing_key(RunStarted(run_id=RUN, attempt=1, agent_id=agent, container_id="c")),
        event_routing_key(AgentHeartbeat(agent_id=agent, sequence=1, max_concurrent=1)),
        event_routing_key(
            LocationLoaded(location="l", generation=1, agent_id=agent, container_id="c")
        ),
    ]


def control_keys() -> list[str]:
    return [
        event_routing_key(RunAccepted(run_id=RUN), CONTROL_SOURCE),
        event_routing_key(RunRejected(run_id=RUN, reason="r"), CONTROL_SOURCE),
        event_routing_key(
            RunRetrying(
                run_id=RUN,
                attempt=1,
                next_attempt=2,
                reason=FailureReason.AGENT_LOST,
                delay_s=1.0,
            ),
            CONTROL_SOURCE,
        ),
        event_routing_key(RunEnded(run_id=RUN, attempt=1, state="SUCCESS"), CONTROL_SOURCE),
    ]


def monitor_decision_key() -> str:
    failed = RunFailed(run_id=RUN, attempt=1, reason=FailureReason.AGENT_LOST)
    return event_routing_key(failed, MONITOR_SOURCE)


async def declared_by(*steps: str) -> FakeBroker:
    """The in-memory broker after the control plane's own declarations, as in the code."""
    broker = FakeBroker()
    async with broker.channel() as channel:
        await declare_topology(channel)  # type: ignore[arg-type]  # aio-pika's surface
        if "targets" in steps:
            await declare_target(channel, INSTRUCTIONS_EXCHANGE, "gpu")  # type: ignore[arg-type]
            await declare_target(channel, CONTROL_EXCHANGE, "a-1")  # type: ignore[arg-type]
    return broker


def assert_covers(p: Permissions, broker: FakeBroker) -> None:
    """Every exchange and queue the code declared may be configured; every binding may be
    made (write on the queue, read on the exchange, the binding key on the status exchange)."""
    for name in [*broker.exchanges, *broker.queues]:
        assert matches(p.configure, name), name
    for exchange, bindings in broker.exchanges.items():
        for queue, key in bindings:
            assert matches(p.write, queue) and matches(p.read, exchange), (queue, exchange)
            if exchange == STATUS_EXCHANGE:
                assert matches(p.status_read, key), key


async def test_the_control_plane_may_declare_and_bind_everything_it_declares() -> None:
    p = control_plane_permissions()
    assert_covers(p, await declared_by("targets"))
    for consumed in ("hd.requests", "hd.status.store", "hd.dead-letters.watch"):
        assert matches(p.read, consumed)
    for exchange in ("hd.instructions", "hd.control", "hd.locations", "hd.status"):
        assert matches(p.write, exchange)
    # Not the monitor's queue, no agent's queue to read, no private queue.
    for other in ("hd.status.monitor", "hd.instructions.gpu", "hd.control.a-1", *PRIVATE):
        assert not matches(p.read, other), other
    for other in ("hd.status.monitor", "hd.instructions.a.b", "amq.default", *PRIVATE):
        assert not matches(p.configure, other) and not matches(p.write, other), other


def test_the_control_plane_publishes_only_its_answers_and_the_relayed_decisions() -> None:
    p = control_plane_permissions()
    for key in [*control_keys(), monitor_decision_key()]:
        assert matches(p.status_keys, key), key
    forged = [
        *agent_keys(),
        f"run.failed.{CONTROL_SOURCE}.{RUN}",
        f"run.accepted.{MONITOR_SOURCE}.{RUN}",
        f"run.ended.{CONTROL_SOURCE}.{RUN}.x",
        f"run.ended.{CONTROL_SOURCE}.not-a-run-id",
    ]
    for key in forged:
        assert not matches(p.status_keys, key), key


async def test_the_monitor_may_touch_only_its_own_queue() -> None:
    broker = await declared_by()
    before = {name: set(bindings) for name, bindings in broker.exchanges.items()}
    queues_before = set(broker.queues)
    async with broker.channel() as channel:
        await declare_monitor_queue(channel)  # type: ignore[arg-type]
    p = monitor_permissions()
    [own] = set(broker.queues) - queues_before
    assert own == "hd.status.monitor" and matches(p.configure, own) and matches(p.read, own)
    added = {n: b - before.get(n, set()) for n, b in broker.exchanges.items()}
    assert added[STATUS_EXCHANGE] == {(own, "agent.#")}
    assert matches(p.write, own) and matches(p.read, STATUS_EXCHANGE)
    # The stale bindings it unbinds are checked by the broker like bindings.
    for key in ("agent.#", "run.#", "run.*"):
        assert matches(p.status_read, key), key
    assert matches(p.write, "hd.dead-letters")  # what it cannot take
    for name in EVERY_EXCHANGE:
        if name != "hd.dead-letters":
            assert not matches(p.write, name), name
    for name in [*queues_before, *PRIVATE, "hd.instructions.gpu"]:
        assert not matches(p.configure, name) and not matches(p.read, name), name
    for key in [*control_keys(), monitor_decision_key(), *agent_keys()]:
        assert not matches(p.status_keys, key), key


async def test_the_web_process_may_only_publish_requests() -> None:
    broker = await declared_by()
    p = web_permissions()
    assert matches(p.write, "hd.requests")
    for name in EVERY_EXCHANGE:
        if name != "hd.requests":
            assert not matches(p.write, name), name
    # It declares and reads nothing: without read on any exchange it can bind nothing, not
    # even into the requests queue its write permission names too.
    for name in [*broker.queues, *EVERY_EXCHANGE, *PRIVATE, "hd.instructions.gpu"]:
        assert not matches(p.configure, name) and not matches(p.read, name), name
    for key in [*control_keys(), monitor_decision_key(), *agent_keys(), "run.#", "agent.#"]:
        assert not matches(p.status_keys, key) and not matches(p.status_read, key), key


def test_a_submitter_may_publish_requests_and_follow_one_run_at_a_time() -> None:
    p = submitter_permissions()
    assert matches(p.write, "hd.requests")
    for name in EVERY_EXCHANGE:
        if name != "hd.requests":
            assert not matches(p.write, name), name
    for private in PRIVATE:
        assert all(matches(pattern, private) for pattern in (p.configure, p.write, p.read))
    assert matches(p.read, STATUS_EXCHANGE)
    for queue in ("hd.requests", "hd.status.store", "hd.instructions.default", "hd.control.a"):
        assert not matches(p.configure, queue) and not matches(p.read, queue), queue
    assert matches(p.status_read, follow_pattern(RUN))
    for key in ("run.#", "#", "run.*.*.*", "agent.#", f"run.*.*.{RUN}.x", f"run.*.a-1.{RUN}"):
        assert not matches(p.status_read, key), key
    for key in [*control_keys(), *agent_keys(), monitor_decision_key(), ""]:
        assert not matches(p.status_keys, key), key


def submission(queue: str = "default", location: str | None = None) -> SubmitRun:
    if location is None:
        return SubmitRun(run_id=uuid.uuid4(), image="busybox", queue=queue)
    return SubmitRun(run_id=uuid.uuid4(), location=location, job="j", queue=queue)


def test_only_a_trusted_identity_or_a_registered_token_may_submit() -> None:
    tokens = Registry(True, {"ci": Limits()})
    assert sender_problem("ci", ["cp"], tokens) is None
    assert sender_problem("cp", ["cp"], tokens) is None
    refused = sender_problem("a-1", ["cp"], tokens)
    assert refused is not None and "'a-1' may not submit runs" in refused
    assert sender_problem("a-1", ["cp"], Registry()) is not None
    # No user_id: accepted until tokens are in use, so that no token sheds its limits so.
    assert sender_problem(None, ["cp"], Registry()) is None
    anonymous = sender_problem(None, ["cp"], tokens)
    assert anonymous is not None and "user_id" in anonymous


def test_a_token_submits_only_within_its_limits() -> None:
    queues = Limits(queues=("default", "cpu"))
    assert limits_problem("ci", queues, submission("cpu"), "cpu") is None
    refused = limits_problem("ci", queues, submission("gpu"), "gpu")
    assert refused == "submitter 'ci' may not submit to queue 'gpu' (allowed: default, cpu)"
    # A job's queue is its location's, whatever the submission says.
    assert limits_problem("ci", queues, submission("gpu", location="etl"), "cpu") is None
    assert limits_problem("ci", queues, submission("cpu", location="etl"), "gpu") is not None

    located = Limits(locations=("etl",))
    assert limits_problem("ci", located, submission(location="etl"), "any") is None
    other = limits_problem("ci", located, submission(location="ml"), "any")
    assert other == "submitter 'ci' may not submit to location 'ml' (allowed: etl)"
    plain = limits_problem("ci", located, submission(), "default")
    assert plain is not None and "only jobs of its locations" in plain
    assert limits_problem("ci", Limits(), submission("anything"), "anything") is None
