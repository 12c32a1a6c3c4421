"""Bad input is answered and isolated: refused at the edge, dead-lettered with a reason, and
never stops the messages behind it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid

import asyncpg
import pytest

from dispatcher.errors import InvalidSubmission, SubmissionRejected
from dispatcher.states import RunState
from dispatcher.store import Database
from dispatcher.store.answers import Said
from schemas import RunRejected, RunStateWanted, SubmitRun, encode
from schemas.topology import REQUESTS_EXCHANGE, REQUESTS_QUEUE, REQUESTS_ROUTING_KEY
from tests.integration.conftest import Stack
from tests.integration.test_crashes import publish_raw
from tests.integration.test_dispatch import wait_for_state
from tests.integration.test_operators import dispatcher_cli
from tests.support import eventually


async def run_count(store: Database) -> int:
    return len(await store.runs.recent(limit=1000))


async def dead_letter_total(store: Database, queue: str) -> int:
    return sum(c["total"] for c in await store.dead_letters.counts() if c["source_queue"] == queue)


async def test_bad_submissions_are_refused_before_sending(stack: Stack, store: Database) -> None:
    await stack.start_control_plane()
    await stack.start_agent()
    refusals = {
        "queue": ("submit", "--queue", "gpu!", "--image", stack.run_image, "--", "true"),
        "image": ("submit", "--image", "bad\x01image", "--queue", stack.queue, "--", "true"),
        "image ": ("submit", "--image", "a b c", "--queue", stack.queue, "--", "true"),
        "queue ": ("submit", "--queue", "q" * 65, "--image", stack.run_image, "--", "true"),
    }
    for field, args in refusals.items():
        result = await dispatcher_cli(stack, *args)
        assert result.returncode == 2, result
        assert "invalid submission" in result.stderr and field.strip() in result.stderr
        assert result.stdout == ""  # no run id printed
    async with stack.client() as client:
        with pytest.raises(InvalidSubmission) as refused:
            await client.submit(stack.run_image, ["true"], env={"A=B": "x"}, queue=stack.queue)
        assert refused.value.field is not None and refused.value.field.startswith("env")
        with pytest.raises(InvalidSubmission, match="exceeds the limit"):
            await client.submit(stack.run_image, ["x" * (2 * 1024 * 1024)], queue=stack.queue)
        with pytest.raises(InvalidSubmission) as refused:
            await client.submit(stack.run_image, ["a\x00b"], queue=stack.queue)
        # Later runs flow.
        run_id = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    assert (await wait_for_state(store, run_id, RunState.SUCCESS)).state == RunState.SUCCESS
    assert await run_count(store) == 1


async def test_hostile_requests_are_dead_lettered_and_answered(
    stack: Stack, store: Database
) -> None:
    control_plane = await stack.start_control_plane()
    await stack.start_agent()
    deep = "[" * 5000 + "]" * 5000

    def submission(run_id: uuid.UUID, **fields: object) -> bytes:
        body = json.loads(
            encode(SubmitRun(run_id=run_id, image=stack.run_image, queue=stack.queue))
        )
        body.update(fields)
        return json.dumps(body).encode()

    hostile = {
        "nested": lambda run_id: submission(run_id).replace(
            b"{", b'{"x": ' + deep.encode() + b", ", 1
        ),
        "nul": lambda run_id: submission(run_id, command=["a\x00b"]),
        "huge integer": lambda run_id: submission(run_id, memory_limit_mb=2**40),
        "unknown kind": lambda run_id: submission(run_id, kind="SubmitRocket"),
        "newer schema": lambda run_id: submission(run_id, schema_version=99),
    }
    run_ids = {name: uuid.uuid4() for name in hostile}
    async with stack.client() as client:
        follower = await client.follow(set(run_ids.values()))
        for name, make in hostile.items():
            await publish_raw(
                stack.amqp_url, REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, make(run_ids[name])
            )
        answered: dict[uuid.UUID, str] = {}

        async def answers() -> None:
            async for event in follower.events(answers=True):
                if isinstance(event, RunRejected):
                    answered[event.run_id] = event.reason
                    if len(answered) == 3:
                        return

        # A SubmitRun that can still be read for its run id is answered; an unknown kind,
        # or a payload too deep to read at all, names nobody to answer.
        await asyncio.wait_for(answers(), 60)
        assert set(answered) == {run_ids[n] for n in ("nul", "huge integer", "newer schema")}
        assert "memory_limit_mb" in answered[run_ids["huge integer"]]
        assert "schema_version" in answered[run_ids["newer schema"]]
        assert "NUL" in answered[run_ids["nul"]] or "command" in answered[run_ids["nul"]]
        # Kept, each refusal is said again to a waiter that asks (one that lost its
        # connection meanwhile): an ask about an unknown run says nothing.
        refused = [run_ids[n] for n in ("nul", "huge integer", "newer schema")]
        asks = [RunStateWanted(run_id=run_id) for run_id in [*refused, run_ids["unknown kind"]]]
        assert await store.say_again(asks, [None] * len(asks)) == [Said.REFUSED] * 3 + [
            Said.UNKNOWN
        ]

        async def all_counted() -> bool:
            return await dead_letter_total(store, REQUESTS_QUEUE) == len(hostile)

        await eventually(all_counted, 60, interval=0.3, what="five dead letters counted")
        # The control plane never stopped, and later runs flow.
        assert control_plane.process is not None and control_plane.process.poll() is None
        outcome = await client.submit_and_wait(
            stack.run_image, ["true"], queue=stack.queue, timeout=60
        )
    assert outcome.succeeded
    assert await run_count(store) == 1  # no row for any hostile submission
    alerts = await store.alerts.recent()
    assert any(a["kind"] == "messages_dead_lettered" for a in alerts)


async def test_an_unpublishable_instruction_fails_its_run_and_blocks_nothing(
    stack: Stack, store: Database
) -> None:
    # A row that no broker takes (a queue name from before names were checked) sits first
    # in the outbox; the relay sets it aside and the runs behind it go out.
    stuck = SubmitRun(run_id=uuid.uuid4(), image=stack.run_image, queue="gpu!")
    await store.runs.create([stuck])
    await stack.start_control_plane()
    await stack.start_agent()
    async with stack.client() as client:
        later = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    assert (await wait_for_state(store, later, RunState.SUCCESS)).state == RunState.SUCCESS
    failed = await wait_for_state(store, stuck.run_id, RunState.FAILURE)
    assert failed.failure_reason == "LAUNCH_ERROR"
    assert failed.failure_message and "gpu!" in failed.failure_message
    connection = await asyncpg.connect(
        stack.database_url, server_settings={"search_path": stack.schema}
    )
    try:
        error = await connection.fetchval(
            "SELECT error FROM outbox WHERE run_id = $1 AND kind = 'LaunchRun'", stuck.run_id
        )
    finally:
        await connection.close()
    assert error and "gpu!" in error


async def test_wait_follows_a_retried_run_to_its_success(stack: Stack, store: Database) -> None:
    await stack.start_control_plane()
    await stack.start_monitor()
    first = await stack.start_agent(0)
    waiter = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "submit",
        "--wait",
        "--image",
        stack.run_image,
        "--queue",
        stack.queue,
        "--",
        "sh",
        "-c",
        "sleep 3",
        env=stack._env_for_cli(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert waiter.stdout is not None
    run_id = uuid.UUID((await asyncio.wait_for(waiter.stdout.readline(), 60)).decode().strip())
    await wait_for_state(store, run_id, RunState.STARTED)
    # The agent dies with the run in flight: the monitor fails the attempt over (AGENT_LOST,
    # retried) and another agent runs attempt 2.
    first.signal(signal.SIGKILL)
    await stack.start_agent(1)
    _, stderr = await asyncio.wait_for(waiter.communicate(), 120)
    printed = stderr.decode()
    assert waiter.returncode == 0, printed
    assert "attempt 1: failed (AGENT_LOST)" in printed
    assert "retrying as attempt 2" in printed
    assert "SUCCESS, exit code 0 on attempt 2" in printed
    run = await store.runs.get(run_id)
    assert (run.state, run.attempt) == (RunState.SUCCESS, 2)


async def test_a_refused_plain_run_is_reported_to_its_waiter(stack: Stack, store: Database) -> None:
    await stack.start_control_plane()
    async with stack.client() as client:
        with pytest.raises(SubmissionRejected, match="needs an image"):
            # Valid on the wire, refused by the control plane: no image and no job.
            await client.submit_and_wait("", (), queue=stack.queue, timeout=60)
    assert await run_count(store) == 0


async def test_dead_letters_from_agent_queues_no_agent_has_are_counted_as_other(
    stack: Stack, store: Database
) -> None:
    """Any agent may publish dead letters, and the source queue is its header: one naming a
    queue of an agent the control plane knows is counted under that name; one naming a queue
    no agent has (invented, one new name a letter) is counted as ``other``, so that names
    cannot grow counters, metric labels and hourly alerts without end."""
    import aio_pika

    from schemas.topology import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE_HEADER

    await stack.start_control_plane()
    await stack.start_agent()
    known = f"hd.control.{stack.agent_id()}"
    invented = [f"hd.control.ghost-{n}" for n in range(5)] + ["hd.instructions.ghost"]
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        for source in [known, *invented, f"hd.instructions.{stack.queue}"]:
            headers = {DEAD_LETTER_QUEUE_HEADER: source}
            await exchange.publish(aio_pika.Message(b"{}", headers=headers), source)

    async def counted() -> dict[str, int] | None:
        counts = {c["source_queue"]: c["total"] for c in await store.dead_letters.counts()}
        return counts if sum(counts.values()) >= 8 else None

    counts = await eventually(counted, 30, what="the 8 dead letters counted")
    assert counts == {known: 1, f"hd.instructions.{stack.queue}": 1, "other": 6}


async def test_a_message_whose_properties_cannot_be_read_is_poison_not_a_lost_connection(
    stack: Stack, store: Database
) -> None:
    """The broker passes on a message_id that is not UTF-8 (or a timestamp past any calendar)
    from any publisher; the AMQP library could not read it and closed the connection, again
    at every redelivery, taking the consumer's every channel with it. It is dead-lettered
    with the reason, and what comes after it is handled."""
    import pika

    await stack.start_control_plane()
    await stack.start_agent()
    submission = SubmitRun(run_id=uuid.uuid4(), image=stack.run_image, queue=stack.queue)

    def publish() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(stack.amqp_url))
        try:
            channel = connection.channel()
            for properties in (
                pika.BasicProperties(message_id=b"AB\xff\xfeEF"),  # type: ignore[arg-type]
                pika.BasicProperties(timestamp=2**63 - 1),
            ):
                channel.basic_publish(
                    REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, encode(submission), properties
                )
        finally:
            connection.close()

    await asyncio.to_thread(publish)
    async with stack.client() as client:
        after = await client.submit(stack.run_image, ["true"], queue=stack.queue)
    run = await wait_for_state(store, after, RunState.SUCCESS, RunState.FAILURE, timeout=60)
    assert run.state == RunState.SUCCESS

    async def both_dead_lettered() -> list[str] | None:
        letters = await store.dead_letters.latest(50)
        reasons = [
            letter.reason
            for letter in letters
            if letter.source_queue == REQUESTS_QUEUE
            and "properties cannot be read" in letter.reason
        ]
        return reasons if len(reasons) == 2 else None

    await eventually(both_dead_lettered, 30, what="both unreadable messages dead-lettered")
    with pytest.raises(Exception, match="no run"):
        await store.runs.get(submission.run_id)


async def test_a_dead_letter_whose_properties_cannot_be_read_is_recorded_with_that_reason(
    stack: Stack, store: Database
) -> None:
    """The dead-letter watch dead-letters nothing (it would feed itself): one whose
    properties cannot be read is recorded as it comes, with that reason, not dropped."""
    import pika

    from schemas.topology import DEAD_LETTER_EXCHANGE

    await stack.start_control_plane()

    def publish() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(stack.amqp_url))
        try:
            properties = pika.BasicProperties(message_id=b"\xff\xfe")  # type: ignore[arg-type]
            connection.channel().basic_publish(DEAD_LETTER_EXCHANGE, "anything", b"x", properties)
        finally:
            connection.close()

    await asyncio.to_thread(publish)

    async def recorded() -> list[str] | None:
        letters = await store.dead_letters.latest(10)
        found = [d.reason for d in letters if "properties cannot be read" in d.reason]
        return found or None

    [reason] = await eventually(recorded, 30, what="the unreadable dead letter recorded")
    assert reason.startswith("its properties cannot be read (UnmarshalingException")
