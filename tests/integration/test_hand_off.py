"""The intake hands its new runs' LaunchRun to the relay of its own process, on real
PostgreSQL and RabbitMQ: the rows are leased to it (no relay claims them, no one is woken for
them), published and marked sent; refused ones go back to the relay's own round, and those
of a process that died before publishing are any relay's once the lease is over."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import asyncpg
import pytest

from dispatcher.relay import OutboxRelay
from dispatcher.states import RunState
from dispatcher.store import Database, OutboxItem, OutboxRow, runs
from dispatcher.store import outbox as outbox_rows
from schemas import LaunchRun, RunAccepted, SubmitRun, instruction_decoder
from tests.integration.conftest import Stack
from tests.integration.test_intake_store import writer_heard_on
from tests.support import eventually
from transport.connection import Connection, connect
from transport.publisher import Publisher
from transport.topology import declare_instructions_queue, declare_topology


@pytest.fixture
async def broker_connection(vhost_url: str) -> AsyncIterator[Connection]:
    connection = await connect(vhost_url, "test-hand-off")
    async with connection.channel() as channel:
        await declare_topology(channel)
    yield connection
    await connection.close()


async def accepted_and_handed(store: Database, submission: SubmitRun) -> list[OutboxItem]:
    """The intake's store call for one new run, with its launch handed to the caller."""
    handed: list[OutboxItem] = []
    assert await store.accept_submissions([submission], handed=handed) == [submission.run_id]
    return handed


async def taken_by_a_round(store: Database) -> int:
    """How many rows a relay's own round takes now (and marks sent; it publishes nothing)."""
    taken: list[OutboxRow] = []

    async def publish(rows: Sequence[OutboxRow]) -> dict[int, str]:
        taken.extend(rows)
        return {}

    await store.publish_outbox(publish)
    return len(taken)


async def test_handed_launches_are_published_by_their_writer_not_by_any_relay_round(
    store: Database, broker_connection: Connection, unique: str
) -> None:
    queue = f"hand-{unique}"
    first, second = (SubmitRun(run_id=uuid.uuid4(), image="img", queue=queue) for _ in range(2))
    handed: list[OutboxItem] = []
    async with writer_heard_on(store, outbox_rows.OUTBOX_CHANNEL) as writer:
        session = writer.connection
        async with session.transaction():
            created = await runs.create(session, [first, second], handed=handed)
        assert created == [first.run_id, second.run_id]
        # Leased rows wake no relay: the next unleased row's wake-up is the marker, since one
        # session's notifications arrive in commit order.
        async with session.transaction():
            marker = outbox_rows.answer(RunAccepted(run_id=uuid.uuid4()))
            assert await outbox_rows.insert(session, [marker]) == 1
        await eventually(writer.was_heard, timeout=60)
        assert writer.heard == [writer.pid]
    assert [item.message.run_id for item in handed] == created  # type: ignore[attr-defined]
    # No relay's round takes them while they are leased (only the marker is due).
    assert await taken_by_a_round(store) == 1
    assert await store.outbox.count_unsent("LaunchRun") == 2

    async with broker_connection.channel() as channel:
        waiting = await declare_instructions_queue(channel, queue)
        relay = OutboxRelay(store, Publisher(broker_connection))
        relay.hand_off(handed)

        async def all_settled() -> bool:
            return await store.outbox.count_unsent("LaunchRun") == 0

        await eventually(all_settled, timeout=30, what="handed rows marked sent")
        got = []
        while (message := await waiting.get(no_ack=True, fail=False)) is not None:
            got.append(instruction_decoder().decode(message.body))
    assert [(m.run_id, m.attempt) for m in got if isinstance(m, LaunchRun)] == [
        (first.run_id, 1),
        (second.run_id, 1),
    ]


async def test_a_handed_launch_the_broker_refuses_goes_back_to_the_relay_which_sets_it_aside(
    store: Database, broker_connection: Connection
) -> None:
    # A queue name no broker takes (stored before names were checked, say).
    stuck = SubmitRun(run_id=uuid.uuid4(), image="img", queue="gpu!")
    handed = await accepted_and_handed(store, stuck)
    async with woken(store) as was_woken:
        relay = OutboxRelay(store, Publisher(broker_connection))
        relay.hand_off(handed)
        # Handed back, it is due at once, and the relay is woken for it.
        await eventually(lambda: _due(store, stuck.run_id), timeout=30, what="handed back")
        await eventually(was_woken, timeout=60, what="the relay woken")
    # The relay's round sets it aside and fails the run.
    assert await store.publish_outbox(relay._publish) == 1
    run = await store.runs.get(stuck.run_id)
    assert (run.state, run.failure_reason) == (RunState.FAILURE, "LAUNCH_ERROR")
    assert run.failure_message and "gpu!" in run.failure_message
    assert await store.outbox.count_unsent("LaunchRun") == 0


async def test_handed_launches_go_back_to_the_relay_when_the_broker_is_gone(
    store: Database, vhost_url: str
) -> None:
    run = SubmitRun(run_id=uuid.uuid4(), image="img", queue="q")
    handed = await accepted_and_handed(store, run)
    connection = await connect(vhost_url, "test-hand-off-gone")
    await connection.close()
    publisher = Publisher(connection, retry_deadline_s=0.5)
    relay = OutboxRelay(store, publisher)
    relay.hand_off(handed)
    await relay.drain(timeout=30)
    assert await _due(store, run.run_id)
    assert await taken_by_a_round(store) == 1


async def test_a_batch_with_a_refusal_writes_in_one_transaction_and_hands_only_launches(
    store: Database,
) -> None:
    plain = SubmitRun(run_id=uuid.uuid4(), image="img", queue="q")
    refused = SubmitRun(run_id=uuid.uuid4(), image="", queue="q")  # no image, no job
    handed: list[OutboxItem] = []
    created = await store.accept_submissions([refused, plain], handed=handed)
    assert created == [plain.run_id]
    assert [(type(i.message), i.message.run_id) for i in handed] == [  # type: ignore[attr-defined]
        (LaunchRun, plain.run_id)
    ]
    async with store.connections.connection() as connection:
        rows = await connection.fetch(
            "SELECT run_id, kind, not_before > now() AS leased FROM outbox ORDER BY id"
        )
    assert [(r["run_id"], r["kind"], r["leased"]) for r in rows] == [
        (refused.run_id, "RunRejected", None),
        (plain.run_id, "LaunchRun", True),
    ]
    # The refusal's answer is due at once; the launch is its writer's.
    assert await taken_by_a_round(store) == 1


async def test_launches_handed_to_a_process_that_died_are_any_relays_after_the_lease(
    store: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_rows, "LEASE_S", 3600.0)
    run = SubmitRun(run_id=uuid.uuid4(), image="img", queue="q")
    await accepted_and_handed(store, run)
    # Its writer never publishes it (it died): no relay's round takes it during the lease...
    assert await taken_by_a_round(store) == 0
    # ... and the first round after it does.
    async with store.connections.connection() as connection:
        await connection.execute(
            "UPDATE outbox SET not_before = now() - interval '1 second' WHERE run_id = $1",
            run.run_id,
        )
    assert await taken_by_a_round(store) == 1


async def test_the_intake_hands_its_launches_to_the_relay_of_its_process(
    stack: Stack, store: Database
) -> None:
    await stack.start_control_plane()  # intake, relay and status in one process
    await stack.start_agent()
    async with stack.client() as client:
        outcome = await client.submit_and_wait(
            stack.run_image, ["true"], queue=stack.queue, timeout=60
        )
    assert outcome.succeeded
    async with store.connections.connection() as connection:
        [row] = await connection.fetch(
            "SELECT sent_at, not_before FROM outbox WHERE kind = 'LaunchRun'"
        )
    # Sent while its lease ran: by the relay it was handed to, not by a round of any relay.
    assert row["not_before"] is not None and row["sent_at"] < row["not_before"]


async def _due(store: Database, run_id: uuid.UUID) -> bool:
    async with store.connections.connection() as connection:
        return bool(
            await connection.fetchval(
                "SELECT not_before IS NULL AND sent_at IS NULL FROM outbox"
                " WHERE run_id = $1 AND kind = 'LaunchRun'",
                run_id,
            )
        )


@contextlib.asynccontextmanager
async def woken(store: Database) -> AsyncIterator[Callable[[], Awaitable[bool]]]:
    """Whether a NOTIFY for the relay came (from any session) while inside."""
    heard: list[str] = []
    listener = await asyncpg.connect(store.connections.dsn)
    await listener.add_listener(outbox_rows.OUTBOX_CHANNEL, lambda *args: heard.append("x"))

    async def was_woken() -> bool:
        return bool(heard)

    try:
        yield was_woken
    finally:
        await listener.close()


async def test_a_relay_remembers_declared_queues_only_for_instructions_and_control(
    store: Database, broker_connection: Connection, unique: str
) -> None:
    """Answers keyed by run id need no queue: remembered, they were one entry a run for as
    long as the process lived. Instruction and control queues are declared before their
    first message, once."""
    from schemas import TerminateRun
    from schemas.topology import CONTROL_EXCHANGE, INSTRUCTIONS_EXCHANGE

    items = [outbox_rows.answer(RunAccepted(run_id=uuid.uuid4())) for _ in range(50)]
    launch = LaunchRun(run_id=uuid.uuid4(), attempt=1, image="img")
    stop = TerminateRun(run_id=uuid.uuid4(), attempt=1, reason="test", grace_s=1.0)
    items += [
        OutboxItem(launch, INSTRUCTIONS_EXCHANGE, f"q-{unique}"),
        OutboxItem(stop, CONTROL_EXCHANGE, f"agent-{unique}"),
    ]
    async with store.connections.transaction() as connection:
        assert await outbox_rows.insert(connection, items) == len(items)
    relay = OutboxRelay(store, Publisher(broker_connection))
    while await store.publish_outbox(relay._publish):
        pass
    assert await store.outbox.count_unsent("RunAccepted") == 0
    assert set(relay._declared) == {
        (INSTRUCTIONS_EXCHANGE, f"q-{unique}"),
        (CONTROL_EXCHANGE, f"agent-{unique}"),
    }
