"""Many runs at once, and poison messages on every queue the project consumes."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika

from dispatcher.states import RunState
from dispatcher.store import Database
from schemas.topology import (
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_QUEUE_HEADER,
    DEAD_LETTER_REASON_HEADER,
    INSTRUCTIONS_EXCHANGE,
    REQUESTS_EXCHANGE,
    REQUESTS_QUEUE,
    REQUESTS_ROUTING_KEY,
    STATUS_EXCHANGE,
    STATUS_STORE_QUEUE,
    instructions_queue,
)
from tests.integration.conftest import Stack
from tests.integration.test_crashes import publish_raw
from tests.integration.test_dispatch import wait_for_state
from tests.support import eventually


async def test_fifty_runs_submitted_at_once_all_end_right(stack: Stack, store: Database) -> None:
    await stack.start_control_plane()
    await stack.start_agent(max_concurrent=8)
    expected: dict[uuid.UUID, int] = {}
    async with stack.client() as client:
        submissions = [
            client.submit(
                stack.run_image, ["sh", "-c", f"echo run {i}; exit {i % 3}"], queue=stack.queue
            )
            for i in range(50)
        ]
        run_ids = await asyncio.gather(*submissions)
    for i, run_id in enumerate(run_ids):
        expected[run_id] = i % 3

    async def all_terminal() -> bool:
        runs = await store.runs.recent(limit=100)
        return len(runs) == 50 and all(
            r.state in (RunState.SUCCESS, RunState.FAILURE) for r in runs
        )

    await eventually(all_terminal, timeout=240, interval=0.5, what="50 runs terminal")
    for run in await store.runs.recent(limit=100):
        code = expected[run.run_id]
        assert run.exit_code == code
        assert run.state == (RunState.SUCCESS if code == 0 else RunState.FAILURE)
        i = run_ids.index(run.run_id)
        assert run.output_tail == [f"run {i}"]


async def dead_letters(url: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(url)
    found = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(DEAD_LETTER_QUEUE, ensure=True)
        while (message := await queue.get(fail=False)) is not None:
            found.append(message)
            await message.ack()
    return found


async def test_malformed_messages_are_dead_lettered_and_consumers_go_on(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()
    await stack.start_agent()
    poison = {
        REQUESTS_QUEUE: (REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, b'{"kind": "SubmitRun"}'),
        STATUS_STORE_QUEUE: (STATUS_EXCHANGE, "run.started", b"\xff not json"),
        instructions_queue(stack.queue): (
            INSTRUCTIONS_EXCHANGE,
            stack.queue,
            b'{"kind": "LaunchRocket", "run_id": 1}',
        ),
    }
    for exchange, key, body in poison.values():
        await publish_raw(stack.amqp_url, exchange, key, body)

    collected: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}

    async def all_dead_lettered() -> bool:
        for message in await dead_letters(stack.amqp_url):
            collected[str(message.headers[DEAD_LETTER_QUEUE_HEADER])] = message
        return set(collected) >= set(poison)

    await eventually(all_dead_lettered, 60, interval=0.3, what="three dead letters")
    assert set(collected) == set(poison)
    for queue, (_, _, body) in poison.items():
        assert collected[queue].body == body
    reasons = {q: str(m.headers[DEAD_LETTER_REASON_HEADER]) for q, m in collected.items()}
    assert "image" in reasons[REQUESTS_QUEUE] or "run_id" in reasons[REQUESTS_QUEUE]
    assert "malformed" in reasons[STATUS_STORE_QUEUE] or "UTF-8" in reasons[STATUS_STORE_QUEUE]
    assert "LaunchRocket" in reasons[instructions_queue(stack.queue)]

    # Every consumer goes on: a valid run passes through all three queues.
    async with stack.client() as client:
        run_id = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    run = await wait_for_state(store, run_id, RunState.SUCCESS, RunState.FAILURE)
    assert run.state == RunState.SUCCESS
    # And the poison was dead-lettered once, not requeued forever.
    assert await dead_letters(stack.amqp_url) == []
