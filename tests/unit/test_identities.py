"""Agent identities: the permissions an agent's broker user gets, and who may speak for whom."""

from __future__ import annotations

import re
import uuid

import pytest

from dispatcher.identities import agent_permissions, agent_url
from dispatcher.provenance import Impersonation, sender_check
from dispatcher.settings import trusted_broker_users
from schemas import AgentHeartbeat, LocationLoaded, RunEnded, RunStarted
from schemas.topology import event_routing_key

pytestmark = pytest.mark.unit


def matches(pattern: str, name: str) -> bool:
    return re.fullmatch(pattern, name) is not None


def test_an_agent_may_touch_only_its_own_queues_and_keys() -> None:
    p = agent_permissions("a-1", ["default", "gpu"])
    for own in ("hd.instructions.default", "hd.instructions.gpu", "hd.control.a-1"):
        assert matches(p.read, own) and not matches(p.configure, own)
    for other in ("hd.instructions.other", "hd.control.a-2", "hd.control.a-1x", "hd.requests"):
        assert not matches(p.configure, other) and not matches(p.read, other)
    private = "amq_" + uuid.uuid4().hex
    assert matches(p.configure, private) and matches(p.read, private)
    assert matches(p.read, "hd.locations")
    for exchange in ("hd.status", "hd.requests", "hd.dead-letters", private):
        assert matches(p.write, exchange)
    for exchange in ("hd.instructions", "hd.control", "hd.locations", "hd.instructions.default"):
        assert not matches(p.write, exchange)
    run = uuid.uuid4()
    own_keys = [
        event_routing_key(RunStarted(run_id=run, attempt=1, agent_id="a-1", container_id="c")),
        event_routing_key(AgentHeartbeat(agent_id="a-1", sequence=1, max_concurrent=1)),
        event_routing_key(
            LocationLoaded(location="l", generation=1, agent_id="a-1", container_id="c")
        ),
    ]
    for key in own_keys:
        assert matches(p.status_keys, key), key
    others = [k.replace("a-1", "a-2") for k in own_keys] + [
        event_routing_key(RunEnded(run_id=run, attempt=1, state="SUCCESS"), "_control"),
        "agent.heartbeat.a-1.x",
    ]
    for key in others:
        assert not matches(p.status_keys, key), key


def test_an_agent_url_carries_its_own_credentials_only() -> None:
    url = agent_url("amqp://admin:pw@broker.example:5671/prod", "a-1", "s/e:c@")
    assert url == "amqp://a-1:s%2Fe%3Ac%40@broker.example:5671/prod"
    # The broker's CA goes along; the operator's certificate and login mechanism do not.
    operator = "amqps://admin@b:5671/?auth=external&cafile=/ca.pem&certfile=/op.pem&keyfile=/k"
    assert agent_url(operator, "a-1", "pw") == "amqps://a-1:pw@b:5671/?cafile=%2Fca.pem"


def test_only_the_agent_itself_or_a_trusted_identity_speaks_for_an_agent() -> None:
    check = sender_check(["control"])
    beat = AgentHeartbeat(agent_id="a-1", sequence=1, max_concurrent=1)
    check("a-1", beat)
    check("control", beat)
    with pytest.raises(Impersonation, match="published by broker user 'a-2', not by agent 'a-1'"):
        check("a-2", beat)
    # Without a user_id nobody knows who sent it: refused, whatever the routing key says.
    with pytest.raises(Impersonation, match="no user_id"):
        check(None, beat)
    # A verdict names no agent: only a trusted identity (the control plane's) gives one.
    verdict = RunEnded(run_id=uuid.uuid4(), attempt=1, state="SUCCESS")
    check("control", verdict)
    with pytest.raises(Impersonation, match="only the control plane and the monitor"):
        check("a-2", verdict)


def test_the_trusted_identities_are_the_process_s_own_and_the_named_ones() -> None:
    env = {"HD_TRUSTED_BROKER_USERS": "ops, audit ,"}
    assert trusted_broker_users("amqp://cp:pw@h/", env) == ("cp", "ops", "audit")
    assert trusted_broker_users("amqp://h/", {}) == ()
