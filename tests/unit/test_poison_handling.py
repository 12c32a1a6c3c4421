"""The control plane's side of poison input: provenance, dead-letter labels, policy targets."""

from __future__ import annotations

import json
import uuid

import pytest

from dispatcher import dead_letters, provenance
from schemas import (
    AgentHeartbeat,
    FailureReason,
    LaunchRun,
    RunEnded,
    RunFailed,
    RunStarted,
    SchemaError,
    encode,
    instruction_decoder,
)
from schemas.topology import DEAD_LETTER_QUEUE_HEADER, DEAD_LETTER_REASON_HEADER
from transport import policies

RUN = uuid.uuid4()


def test_an_event_must_come_under_its_source_s_routing_key() -> None:
    started = RunStarted(run_id=RUN, attempt=1, agent_id="a1", container_id="c")
    provenance.check(f"run.started.a1.{RUN}", started)
    with pytest.raises(provenance.Misrouted):
        provenance.check(f"run.started.a2.{RUN}", started)  # another agent's key
    beat = AgentHeartbeat(agent_id="a1", sequence=0)
    provenance.check("agent.heartbeat.a1", beat)
    with pytest.raises(provenance.Misrouted):
        provenance.check("agent.heartbeat.b", beat)
    with pytest.raises(provenance.Misrouted):
        provenance.check(None, beat)


def test_only_the_control_plane_and_the_monitor_speak_for_themselves() -> None:
    ended = RunEnded(run_id=RUN, attempt=1, state="SUCCESS")
    provenance.check(f"run.ended._control.{RUN}", ended)
    with pytest.raises(provenance.Misrouted):
        provenance.check(f"run.ended.a1.{RUN}", ended)  # an agent forging the verdict
    decision = RunFailed(run_id=RUN, attempt=1, reason=FailureReason.AGENT_LOST)
    provenance.check(f"run.failed._monitor.{RUN}", decision)
    with pytest.raises(provenance.Misrouted):
        provenance.check(f"run.failed._control.{RUN}", decision)


def test_dead_letter_sources_are_labelled_with_known_queues_only() -> None:
    def source(name: object) -> str:
        return dead_letters.seen({DEAD_LETTER_QUEUE_HEADER: name}, b"").source_queue

    assert source("hd.requests") == "hd.requests"
    assert source("hd.instructions.gpu-1") == "hd.instructions.gpu-1"
    assert source("hd.control.agent_7") == "hd.control.agent_7"
    for hostile in ("x" * 10_000, "hd.instructions.a.b", "hd.control.", "amq.gen-1", 5, b"\xff"):
        assert source(hostile) == "other"
    broker = dead_letters.seen({"x-first-death-queue": "hd.requests"}, b"")
    assert broker.source_queue == "hd.requests" and "broker" in broker.reason
    assert "\x00" not in dead_letters.seen({DEAD_LETTER_REASON_HEADER: "a\x00b"}, b"").reason


def test_only_a_dead_launch_instruction_fails_a_run() -> None:
    launch = LaunchRun(run_id=RUN, attempt=2, image="busybox")
    failed = dead_letters.launch_failure(dead_letters.seen({}, encode(launch)))
    assert failed is not None
    assert (failed.run_id, failed.attempt, failed.reason) == (RUN, 2, FailureReason.LAUNCH_ERROR)
    beat = AgentHeartbeat(agent_id="a1", sequence=0)
    assert dead_letters.launch_failure(dead_letters.seen({}, encode(beat))) is None
    assert dead_letters.launch_failure(dead_letters.seen({}, b"[" * 50_000)) is None
    # One an agent could not decode (a bound of another release, a newer version) still
    # names its attempt: failed, not left QUEUED for ever.
    undecodable = json.loads(encode(launch))
    undecodable.update(schema_version=2, cpus=0.001, image="")
    assert decode_fails(json.dumps(undecodable).encode())
    failed = dead_letters.launch_failure(dead_letters.seen({}, json.dumps(undecodable).encode()))
    assert failed is not None and (failed.run_id, failed.attempt) == (RUN, 2)
    for forged in ({"kind": "LaunchRun", "run_id": str(RUN)}, {"kind": "LaunchRun", "attempt": 1}):
        assert (
            dead_letters.launch_failure(dead_letters.seen({}, json.dumps(forged).encode())) is None
        )


def decode_fails(body: bytes) -> bool:
    try:
        instruction_decoder().decode(body)
    except SchemaError:
        return True
    return False


def test_the_management_api_is_found_from_the_broker_url() -> None:
    api = policies.management_api("amqp://u:p%40ss@rabbit:5672/team%2Fa")
    assert (api.base_url, api.user, api.password, api.vhost) == (
        "http://rabbit:15672",
        "u",
        "p@ss",
        "team/a",
    )
    assert policies.management_api("amqps://u:p@rabbit/").base_url == "https://rabbit:15671"
    given = policies.management_api("amqp://u:p@rabbit/", "https://admin:x@proxy/mgmt/")
    assert (given.base_url, given.user, given.password) == ("https://proxy/mgmt", "admin", "x")
    with pytest.raises(policies.BrokerUnavailable):
        policies.management_api("amqp://rabbit/", "http://proxy:notaport/")


def test_every_consumed_queue_has_a_delivery_limit_and_no_dead_letter_loop() -> None:
    import re

    defined = policies.policies(policies.PolicyLimits(delivery_limit=7))

    def policy_of(queue: str) -> dict[str, object]:
        matching = [p for p in defined.values() if re.match(str(p["pattern"]), queue)]
        assert len(matching) == 1, queue
        definition = matching[0]["definition"]
        assert isinstance(definition, dict)
        return definition

    for queue in ("hd.requests", "hd.status.store", "hd.instructions.q", "hd.control.a"):
        assert policy_of(queue)["delivery-limit"] == 7
        assert policy_of(queue)["dead-letter-exchange"] == "hd.dead-letters"
    for queue in ("hd.status.monitor", "hd.dead-letters.watch"):
        assert policy_of(queue)["delivery-limit"] == 7
        assert "dead-letter-exchange" not in policy_of(queue)
    assert policy_of("hd.dead-letters")["max-length"] == 100_000
