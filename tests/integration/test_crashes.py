"""Nothing lost, nothing duplicated: redeliveries, duplicates and processes killed mid-way."""

from __future__ import annotations

import asyncio
import signal
import uuid

import aio_pika

from dispatcher.states import RunState
from dispatcher.store import Database
from schemas import SubmitRun, encode
from schemas.topology import (
    INSTRUCTIONS_EXCHANGE,
    REQUESTS_EXCHANGE,
    REQUESTS_ROUTING_KEY,
    instructions_queue,
)
from tests.integration.conftest import Stack
from tests.integration.test_dispatch import wait_for_state
from tests.support import eventually


async def publish_raw(url: str, exchange: str, routing_key: str, body: bytes) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key
        )


async def test_the_same_launch_delivered_twice_gives_one_container(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(extra=("--keep-finished",))
    async with stack.client() as client:
        run_id = await client.submit(stack.run_image, ["sh", "-c", "sleep 1"], queue=stack.queue)
    # The relay's row, published twice more (a relay that sent it again): the second and third
    # arrive while the first is being launched or running.
    async with store.connections.connection() as connection:
        payload = await eventually(
            lambda: connection.fetchval(
                "SELECT payload FROM outbox WHERE run_id = $1 AND kind = 'LaunchRun'", run_id
            ),
            30,
            what="the run's LaunchRun row",
        )
    for _ in range(2):
        await publish_raw(stack.amqp_url, INSTRUCTIONS_EXCHANGE, stack.queue, bytes(payload))
    run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE)
    assert run.state == RunState.SUCCESS
    # And once more after it finished: acked, not run again.
    await publish_raw(stack.amqp_url, INSTRUCTIONS_EXCHANGE, stack.queue, bytes(payload))

    async def all_acked() -> bool:
        stats = stack.queue_stats(instructions_queue(stack.queue))
        acked = stats.get("message_stats", {}).get("ack", 0)
        return acked >= 4 and stats.get("messages") == 0

    await eventually(all_acked, 60, interval=0.5, what="the broker: all four deliveries acked")
    assert stack.queue_stats(instructions_queue(stack.queue))["message_stats"]["ack"] == 4
    containers = stack.containers_of(run_id)
    assert len(containers) == 1
    assert containers[0].name == f"hd-run-{run_id}-1"


async def test_the_same_submission_published_twice_gives_one_run(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_agent(extra=("--keep-finished",))
    submit = SubmitRun(
        run_id=uuid.uuid4(),
        image=stack.run_image,
        command=("true",),
        queue=stack.queue,
        idempotency_key=f"nightly-{stack.unique}",
    )
    # The same message twice, and a new message with the same idempotency key.
    again = SubmitRun(
        run_id=uuid.uuid4(),
        image=stack.run_image,
        command=("true",),
        queue=stack.queue,
        idempotency_key=f"nightly-{stack.unique}",
    )
    for message in (submit, submit, again):
        await publish_raw(stack.amqp_url, REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, encode(message))
    await wait_for_state(store, submit.run_id, RunState.SUCCESS)
    runs = await store.runs.recent()
    assert [r.run_id for r in runs] == [submit.run_id]
    assert len(stack.containers_of(submit.run_id)) == 1
    assert stack.containers_of(again.run_id) == []


async def test_control_plane_killed_between_commit_and_publish_dispatches_once(
    stack: Stack, store: Database
) -> None:
    # The first control plane commits runs but has no relay: it dies with the outbox full.
    first = await stack.start_control_plane(components="intake,status")
    await stack.start_agent(extra=("--keep-finished",))
    async with stack.client() as client:
        run_ids = [
            await client.submit(stack.run_image, ["sh", "-c", "echo once"], queue=stack.queue)
            for _ in range(3)
        ]
    await eventually(lambda: _runs_queued(store, run_ids), 30, what="runs committed")
    assert await store.outbox.count_unsent("LaunchRun") == 3
    first.kill()
    # A restart picks up the unsent rows and dispatches each run exactly once.
    await stack.start_control_plane()
    for run_id in run_ids:
        run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE)
        assert run.state == RunState.SUCCESS
        assert len(stack.containers_of(run_id)) == 1
    assert await store.outbox.count_unsent("LaunchRun") == 0


async def _runs_queued(store: Database, run_ids: list[uuid.UUID]) -> bool:
    runs = await store.runs.recent(RunState.QUEUED)
    return {r.run_id for r in runs} == set(run_ids)


async def test_agent_killed_while_a_run_runs_adopts_it_after_restart(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    agent = await stack.start_agent()
    async with stack.client() as client:
        run_id = await client.submit(
            stack.run_image, ["sh", "-c", "sleep 3; echo survived"], queue=stack.queue
        )
    await wait_for_state(store, run_id, RunState.STARTED)
    [before] = stack.containers_of(run_id)
    agent.kill()
    await stack.start_agent(extra=("--keep-finished",))
    run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE)
    assert run.state == RunState.SUCCESS
    assert run.output_tail == ["survived"]
    [after] = stack.containers_of(run_id)
    assert after.id == before.id


async def test_agent_exits_0_on_sigterm(stack: Stack) -> None:
    await stack.start_control_plane()
    agent = await stack.start_agent()
    agent.signal(signal.SIGTERM)
    assert agent.process is not None
    # Past its grace + 30 s, an agent whose shutdown hangs exits 1 with its threads' stacks.
    code = await asyncio.to_thread(agent.process.wait, 60)
    assert code == 0, agent.output()
    assert "stopped" in agent.output()
