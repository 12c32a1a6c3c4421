"""Faults outside the project: missing images, broker connections cut."""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path

from dispatcher.client import wait_for_outcome
from dispatcher.states import RunState
from dispatcher.store import Database
from schemas import RunAccepted
from schemas.topology import instructions_queue
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.support import DockerSocketProxy, eventually, management_request


async def test_a_missing_image_fails_the_run_with_image_not_found(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    agent = await stack.start_agent()
    async with stack.client() as client:
        run_id = await client.submit(
            f"hybrid-dispatcher/no-such-image:{stack.unique}", ["true"], queue=stack.queue
        )
    run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE, timeout=90)
    assert run.state == RunState.FAILURE
    assert run.failure_reason == "IMAGE_NOT_FOUND"
    assert "no-such-image" in (run.failure_message or "")
    assert stack.containers_of(run_id) == []
    # The agent goes on with the next instruction.
    async with stack.client() as client:
        ok = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    assert (await wait_for_state(store, ok, RunState.SUCCESS, RunState.FAILURE)).state == (
        RunState.SUCCESS
    )
    assert agent.process is not None and agent.process.poll() is None


def connections_of(management: str, vhost: str) -> list[str]:
    """Names of the client connections of ``vhost`` (the management API lags a few seconds)."""
    listing = management_request(management, "GET", "/api/connections")
    return [c["name"] for c in listing if c.get("vhost") == vhost]


def close_connections(management: str, names: list[str]) -> None:
    for name in names:
        quoted = urllib.parse.quote(name, safe="")
        management_request(management, "DELETE", f"/api/connections/{quoted}")


async def test_components_reconnect_after_the_broker_cuts_them_off(
    stack: Stack, store: Database, broker: tuple[str, str]
) -> None:
    management = broker[1]
    assert management, "this test needs the broker's management API"
    vhost = urllib.parse.urlsplit(stack.amqp_url).path.lstrip("/")
    await stack.start_control_plane()
    await stack.start_agent()
    async with stack.client() as client:
        running = await client.submit(
            stack.run_image, ["sh", "-c", "sleep 2; echo still here"], queue=stack.queue
        )
    await wait_for_state(store, running, RunState.STARTED)

    async def listed() -> list[str]:
        names = connections_of(management, vhost)
        return names if len(names) >= 2 else []

    # Cut once, both the control plane's and the agent's connection.
    names = await eventually(listed, 30, what="the management API listing both connections")
    close_connections(management, names)
    # The run that was in flight is still reported, and new runs still flow.
    run = await wait_for_state(store, running, RunState.SUCCESS, RunState.FAILURE, timeout=90)
    assert run.state == RunState.SUCCESS
    assert run.output_tail == ["still here"]
    async with stack.client() as client:
        after = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    assert (await wait_for_state(store, after, RunState.SUCCESS, RunState.FAILURE)).state == (
        RunState.SUCCESS
    )


async def test_a_wait_hears_an_end_its_cut_connection_lost(
    stack: Stack, store: Database, broker: tuple[str, str]
) -> None:
    """A script's follower loses what is sent while its connection is down; once the
    connection is back it asks how its runs stand, and hears the end it missed."""
    management = broker[1]
    assert management, "this test needs the broker's management API"
    vhost = urllib.parse.urlsplit(stack.amqp_url).path.lstrip("/")
    await stack.start_control_plane()  # no agent: a run stays QUEUED
    async with stack.client() as client:
        ended = await client.submit(stack.run_image, ["true"], queue=stack.queue)
        await wait_for_state(store, ended, RunState.QUEUED, timeout=30)
        await client.cancel(ended, reason="not needed")
        await wait_for_state(store, ended, RunState.CANCELED, timeout=30)
        under_way = await client.submit(stack.run_image, ["true"], queue=stack.queue)
        await wait_for_state(store, under_way, RunState.QUEUED, timeout=30)
        # Followed only now, both runs' news went before: to the follower, as if sent while
        # its connection was down. Only the client's connection is cut.
        async with await client.follow({ended, under_way}) as follower:
            clients = await eventually(
                lambda: client_connections(management, vhost), 30, what="the client listed"
            )
            close_connections(management, clients)
            outcome = await wait_for_outcome(follower, ended, 60)
            assert outcome.canceled and outcome.message == "not needed"

            async def accepted() -> RunAccepted:
                async for event in follower.events(answers=True):
                    if isinstance(event, RunAccepted) and event.run_id == under_way:
                        return event
                raise AssertionError("the status stream ended")

            await asyncio.wait_for(accepted(), 30)


async def test_a_wait_hears_an_end_sent_before_its_queue_was_deleted(
    stack: Stack, store: Database, broker: tuple[str, str]
) -> None:
    """A follower's private queue is deleted under its consumer: the broker
    cancels the consumer, the queue is declared, bound and consumed again on the same
    channel (no reopen), and the follower asks how its runs stand, as after a lost
    connection."""
    management = broker[1]
    assert management, "this test needs the broker's management API"
    vhost = urllib.parse.quote(urllib.parse.urlsplit(stack.amqp_url).path.lstrip("/"), safe="")
    await stack.start_control_plane()  # no agent: a run stays QUEUED
    async with stack.client() as client:
        ended = await client.submit(stack.run_image, ["true"], queue=stack.queue)
        await wait_for_state(store, ended, RunState.QUEUED, timeout=30)
        await client.cancel(ended, reason="not needed")
        await wait_for_state(store, ended, RunState.CANCELED, timeout=30)
        # Followed only now: the run's end went before, as if sent while the queue was gone.
        async with await client.follow({ended}) as follower:
            waiting = asyncio.create_task(wait_for_outcome(follower, ended, 60))

            async def consumed() -> list[str]:
                listing = management_request(management, "GET", f"/api/queues/{vhost}")
                return [q["name"] for q in listing if q.get("exclusive") and q.get("consumers")]

            names = await eventually(consumed, 30, what="the follower's queue consumed")
            # Deleted from a channel of the client's own connection: an exclusive queue is
            # its connection's alone (the management API may not delete it; rabbitmqctl may).
            channel = await client._connection.channel()  # type: ignore[union-attr]
            for name in names:
                await channel.queue_delete(name)
            await channel.close()
            outcome = await waiting
            assert outcome.canceled and outcome.message == "not needed"


async def client_connections(management: str, vhost: str) -> list[str]:
    listing = management_request(management, "GET", "/api/connections")
    return [
        c["name"]
        for c in listing
        if c.get("vhost") == vhost
        and (c.get("client_properties") or {}).get("connection_name") == "dispatcher-client"
    ]


async def test_an_instruction_waits_out_a_docker_outage(
    stack: Stack, store: Database, tmp_path: Path
) -> None:
    proxy = DockerSocketProxy(tmp_path / "docker.sock")
    await proxy.up()
    await stack.start_control_plane()
    agent = await stack.start_agent(env={"DOCKER_HOST": proxy.docker_host})
    await proxy.down()
    async with stack.client() as client:
        run_id = await client.submit(stack.run_image, ["sh", "-c", "echo after"], queue=stack.queue)
    # The instruction is not lost: the agent holds it (delivered, unacked, its create tried
    # again and again), or, when its engine check saw the outage before the instruction came,
    # it took no work meanwhile and the instruction waits in its queue.

    async def waiting() -> str | None:
        stats = stack.queue_stats(instructions_queue(stack.queue))
        if stats.get("messages_unacknowledged") == 1:
            return "held"
        if stats.get("messages_ready") == 1 and "engine does not answer" in agent.output():
            return "left in its queue"
        return None

    how = await eventually(waiting, 60, interval=0.5, what="the instruction kept")
    assert (await store.runs.get(run_id)).state == RunState.QUEUED
    # And says what is wrong: these lines are what an operator reads, asserted as such.
    if how == "held":
        await agent.wait_for_output(f"Docker engine unreachable; run {run_id}", timeout=30)
    else:
        await agent.wait_for_output("the Docker engine does not answer", timeout=30)
    await proxy.up()
    try:
        run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE, timeout=90)
    finally:
        await proxy.down()
    assert run.state == RunState.SUCCESS
    assert run.output_tail == ["after"]
