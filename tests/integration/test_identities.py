"""Agent identities: one broker user per agent, least privilege, and revocation, on a real
RabbitMQ (the test's vhost), PostgreSQL and Docker."""

from __future__ import annotations

import time
import uuid

import aio_pika
import pytest

from dispatcher.states import RunState
from dispatcher.store import Database
from schemas import AgentHeartbeat, LaunchRun, encode
from schemas.topology import CONTROL_EXCHANGE, INSTRUCTIONS_EXCHANGE, STATUS_EXCHANGE
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.integration.test_operators import dispatcher_cli
from tests.support import eventually


async def add_identity(stack: Stack, agent_id: str) -> str:
    added = await dispatcher_cli(stack, "agents", "add", agent_id, "--queue", stack.queue)
    assert added.returncode == 0, added.stderr
    url = added.stdout.strip()
    assert url.startswith("amqp://") and f"{agent_id}:" in url
    assert "shown once" in added.stderr
    return url


async def refused(url: str, attempt: object) -> str:
    """Run ``attempt(channel)`` on a connection of ``url``; the broker's refusal, as text."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(Exception) as caught:
            await attempt(channel)  # type: ignore[operator]
        return repr(caught.value)
    finally:
        await connection.close()


def heartbeat_of(agent_id: str) -> bytes:
    return encode(
        AgentHeartbeat(agent_id=agent_id, sequence=1, queues=("default",), max_concurrent=1)
    )


async def test_an_agent_with_its_own_identity_runs_work_and_can_do_nothing_else(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    agent_id, victim = stack.agent_id(0), stack.agent_id(1)
    url = await add_identity(stack, agent_id)
    await add_identity(stack, victim)
    await stack.start_agent(0, env={"HD_AMQP_URL": url})
    async with stack.client() as client:
        run_id = await client.submit(stack.run_image, ["sh", "-c", "echo hi"], queue=stack.queue)
    run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE, timeout=60)
    assert (run.state, run.agent_id, run.output_tail) == (RunState.SUCCESS, agent_id, ["hi"])

    # What the identity may not do, the broker refuses.
    async def publish_instruction(channel: aio_pika.abc.AbstractChannel) -> None:
        exchange = await channel.get_exchange(INSTRUCTIONS_EXCHANGE, ensure=False)
        launch = LaunchRun(run_id=uuid.uuid4(), attempt=1, image=stack.run_image)
        await exchange.publish(aio_pika.Message(encode(launch)), routing_key=stack.queue)

    async def publish_control(channel: aio_pika.abc.AbstractChannel) -> None:
        exchange = await channel.get_exchange(CONTROL_EXCHANGE, ensure=False)
        await exchange.publish(aio_pika.Message(b"{}"), routing_key=victim)

    async def beat_as_victim(channel: aio_pika.abc.AbstractChannel) -> None:
        exchange = await channel.get_exchange(STATUS_EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(heartbeat_of(victim)), routing_key=f"agent.heartbeat.{victim}"
        )

    async def sign_as_victim(channel: aio_pika.abc.AbstractChannel) -> None:
        exchange = await channel.get_exchange(STATUS_EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(heartbeat_of(agent_id), user_id=victim),
            routing_key=f"agent.heartbeat.{agent_id}",
        )

    async def read_victim_queue(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.get_queue(f"hd.control.{victim}", ensure=False)
        await queue.get(fail=False)

    for attempt in (publish_instruction, publish_control, beat_as_victim, read_victim_queue):
        assert "ACCESS_REFUSED" in await refused(url, attempt), attempt.__name__
    assert "PRECONDITION_FAILED" in await refused(url, sign_as_victim)
    # The victim, never started, is unknown to the control plane: no forged heartbeat landed.
    assert [a["agent_id"] for a in await store.agents.all()] == [agent_id]


async def test_a_revoked_agent_is_cut_off_and_its_runs_fail_over(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_monitor()
    agent_id = stack.agent_id(0)
    url = await add_identity(stack, agent_id)
    agent = await stack.start_agent(0, env={"HD_AMQP_URL": url})
    async with stack.client() as client:
        run_id = await client.submit(
            stack.run_image, ["sleep", "300"], queue=stack.queue, max_retries=0
        )
    await wait_for_state(store, run_id, RunState.STARTED, timeout=60)

    revoked_at = time.monotonic()
    revoked = await dispatcher_cli(stack, "agents", "revoke", agent_id)
    assert revoked.returncode == 0, revoked.stderr
    assert f"agent {agent_id} revoked" in revoked.stdout

    async def lost() -> bool:
        return any(
            a["agent_id"] == agent_id and a["status"] == "LOST" for a in await store.agents.all()
        )

    await eventually(lost, 60, what="the revoked agent declared lost")
    print(f"revoked agent declared lost {time.monotonic() - revoked_at:.1f} s after the revoke")
    run = await wait_for_state(store, run_id, RunState.FAILURE, timeout=60)
    assert run.failure_reason == "AGENT_LOST"
    # Its credentials no longer open a connection.
    with pytest.raises(Exception, match=r"ACCESS_REFUSED|access refused|403"):
        await aio_pika.connect(url, timeout=10)

    # The agent, refused by the broker, stops its container and exits non-zero.
    async def agent_exited() -> bool:
        return agent.process is not None and agent.process.poll() is not None

    await eventually(agent_exited, 180, interval=1.0, what="the revoked agent exiting")
    print(f"revoked agent exited {time.monotonic() - revoked_at:.1f} s after the revoke")
    assert agent.process is not None and agent.process.returncode == 1
    assert "the broker refuses this agent's credentials" in agent.output()
    [container] = stack.containers_of(run_id)
    assert container.status == "exited"
    again = await dispatcher_cli(stack, "agents", "revoke", agent_id)
    assert again.returncode == 1 and f"no agent identity {agent_id!r}" in again.stderr
