"""The intake's transaction on real PostgreSQL: one statement writes a batch's runs, their
first events and their instructions, and the outbox's trigger wakes the relay at commit."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg

from dispatcher.states import RunState
from dispatcher.store import Database, answers, runs
from dispatcher.store import outbox as outbox_rows
from dispatcher.store.connections import connect
from dispatcher.submitters import Limits
from dispatcher.web.sse import RUN_EVENTS_CHANNEL
from schemas import (
    CancelRun,
    FailureReason,
    RunAccepted,
    RunEnded,
    RunRejected,
    RunStateWanted,
    SubmitRun,
    any_decoder,
    instruction_decoder,
)
from tests.support import eventually


async def test_a_batch_writes_one_run_event_and_instruction_for_each_new_run(
    store: Database,
) -> None:
    def submission(queue: str, **fields: object) -> SubmitRun:
        fields.setdefault("run_id", uuid.uuid4())
        fields.setdefault("command", ("true",))
        return SubmitRun(image="img", queue=queue, **fields)  # type: ignore[arg-type]

    first = submission("q1")
    again = submission("q1", run_id=first.run_id, command=("false",))
    keyed = submission("q2", idempotency_key="nightly")
    same_key = submission("q2", idempotency_key="nightly")
    later = submission("q1")

    created = await store.accept_submissions([first, again, keyed, same_key, later])

    assert created == [first.run_id, keyed.run_id, later.run_id]
    for submission in (first, keyed, later):
        kinds = [e.kind for e in await store.runs.events(submission.run_id)]
        assert kinds == ["SubmitRun"], (submission.run_id, kinds)
    # The first of a repeated run id is the one kept: its command, not the repeat's.
    assert (await store.runs.get(first.run_id)).command == ["true"]
    async with store.connections.connection() as connection:
        rows = await connection.fetch(
            "SELECT run_id, kind, routing_key, payload FROM outbox ORDER BY id",
        )
    launches = [(r["run_id"], r["routing_key"]) for r in rows if r["kind"] == "LaunchRun"]
    assert launches == [(first.run_id, "q1"), (keyed.run_id, "q2"), (later.run_id, "q1")]
    # The instruction and the history are the first submission's, not the repeat's.
    [first_launch] = [r["payload"] for r in rows if r["run_id"] == first.run_id]
    assert instruction_decoder().decode(first_launch).command == ("true",)
    [submitted] = await store.runs.events(first.run_id)
    assert submitted.payload["command"] == ["true"]
    # The first events follow the submissions' order.
    seqs = [(await store.runs.events(s.run_id))[0].seq for s in (first, keyed, later)]
    assert seqs == sorted(seqs)
    # The repeated key is answered, and nothing else is: no run, no event, no launch.
    answered = [r["run_id"] for r in rows if r["kind"] == "RunRejected"]
    assert answered == [same_key.run_id]
    assert await store.runs.events(same_key.run_id) == []

    # A batch whose runs all exist already writes nothing more.
    assert await store.accept_submissions([first, keyed]) == []
    assert await store.outbox.count_unsent() == len(rows)


class Writer:
    """A session of its own writing to the store, and the NOTIFYs on ``channel`` that came
    from it (the channel is the database's, shared by all sessions)."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self.pid = connection.get_server_pid()
        self.heard: list[int] = []

    def on_notify(self, _: object, sender: int, channel: str, payload: str) -> None:
        if sender == self.pid:
            self.heard.append(sender)

    async def was_heard(self) -> bool:
        return self.pid in self.heard


@contextlib.asynccontextmanager
async def writer_heard_on(store: Database, channel: str) -> AsyncIterator[Writer]:
    listener = await asyncpg.connect(store.connections.dsn)
    writer = Writer(await connect(store.connections.dsn, store.connections.schema))
    await listener.add_listener(channel, writer.on_notify)
    try:
        yield writer
    finally:
        await writer.connection.close()
        await listener.close()


async def test_writing_outbox_rows_wakes_the_relay_at_commit_and_writing_none_does_not(
    store: Database,
) -> None:
    accepted = outbox_rows.answer(RunAccepted(run_id=uuid.uuid4()))
    async with writer_heard_on(store, outbox_rows.OUTBOX_CHANNEL) as writer:
        session = writer.connection
        async with session.transaction():
            assert await outbox_rows.insert(session, [accepted]) == 1
        await eventually(writer.was_heard, timeout=60)
        assert writer.heard == [writer.pid]

        # The same message again writes no row and wakes no one; a row written by the next
        # transaction does. Notifications of one session arrive in commit order: once the
        # second one is heard, the first would have been.
        writer.heard.clear()
        async with session.transaction():
            assert await outbox_rows.insert(session, [accepted]) == 0
        async with session.transaction():
            another = outbox_rows.answer(RunAccepted(run_id=uuid.uuid4()))
            assert await outbox_rows.insert(session, [another]) == 1
        await eventually(writer.was_heard, timeout=60)
        await asyncio.sleep(0.2)
        assert writer.heard == [writer.pid]


async def test_a_batch_of_runs_that_exist_already_wakes_no_event_stream(store: Database) -> None:
    old = SubmitRun(run_id=uuid.uuid4(), image="img", queue="q")
    async with writer_heard_on(store, RUN_EVENTS_CHANNEL) as writer:
        session = writer.connection
        async with session.transaction():
            assert await runs.create(session, [old]) == [old.run_id]
        await eventually(writer.was_heard, timeout=60)

        # Redelivered: nothing is written, no one is woken. The next new run's wake-up is the
        # marker: notifications of one session arrive in commit order.
        writer.heard.clear()
        async with session.transaction():
            assert await runs.create(session, [old]) == []
        new = SubmitRun(run_id=uuid.uuid4(), image="img", queue="q")
        async with session.transaction():
            assert await runs.create(session, [new]) == [new.run_id]
        await eventually(writer.was_heard, timeout=60)
        await asyncio.sleep(0.2)
        assert writer.heard == [writer.pid]


async def test_every_json_column_of_a_run_reads_back_as_submitted(store: Database) -> None:
    """command, env, tags, retry_on, ready_check and config are written as JSON text for
    jsonb columns: non-ASCII text, escapes, nesting and numbers come back as they went in."""
    submission = SubmitRun(
        run_id=uuid.uuid4(),
        image="img",
        command=("sh", "-c", 'echo "héllo\\n" \t✓'),
        env={"GREETING": "grüße ✓", "QUOTE": '"x"', "EMPTY": ""},
        tags={"team": "ml", "ünï": "ok"},
        retry_on=(FailureReason.AGENT_LOST, FailureReason.EXIT_CODE),
        ready_check=("test", "-f", "/tmp/ready"),
    )
    assert await store.accept_submissions([submission]) == [submission.run_id]
    async with store.connections.connection() as connection:
        record = await connection.fetchrow(
            "SELECT * FROM runs WHERE run_id = $1", submission.run_id
        )
    row = runs.decoded(record)
    assert row["command"] == list(submission.command)
    assert row["env"] == submission.env
    assert row["tags"] == submission.tags
    assert row["ready_check"] == list(submission.ready_check)
    assert runs.retry_policy(row).retry_on == submission.retry_on
    assert row["config"] == {}
    launch = runs.launch(row, 1)
    assert (launch.command, launch.env) == (submission.command, submission.env)


async def test_a_run_asked_about_is_announced_again_where_it_stands(store: Database) -> None:
    under_way, ended, unknown = (
        SubmitRun(run_id=uuid.uuid4(), image="img", command=("true",)) for _ in range(3)
    )
    refused = SubmitRun(run_id=uuid.uuid4(), location="nowhere", job="job")
    await store.accept_submissions([under_way, ended, refused])
    [canceled] = await store.cancel([CancelRun(run_id=ended.run_id, reason="not needed")])
    assert not isinstance(canceled, str) and canceled.state == RunState.CANCELED
    asks = [RunStateWanted(run_id=r.run_id) for r in (under_way, ended, unknown, refused)]
    async with store.connections.connection() as connection:
        before = await connection.fetchval("SELECT max(id) FROM outbox")

    said = await store.say_again(asks, [None] * 4)

    assert said == [
        answers.Said.UNDER_WAY,
        answers.Said.ENDED,
        answers.Said.UNKNOWN,
        answers.Said.REFUSED,
    ]
    async with store.connections.connection() as connection:
        rows = await connection.fetch(
            "SELECT payload FROM outbox WHERE id > $1 ORDER BY id", before
        )
    # One answer to each ask, none for the run nobody knows.
    again = [any_decoder().decode(r["payload"]) for r in rows]
    assert [(type(t).__name__, t.run_id) for t in again] == [
        ("RunAccepted", under_way.run_id),
        ("RunEnded", ended.run_id),
        ("RunRejected", refused.run_id),
    ]
    assert isinstance(again[2], RunRejected) and "nowhere" in again[2].reason
    ended_again = again[1]
    assert isinstance(ended_again, RunEnded)
    assert (ended_again.state, ended_again.message) == ("CANCELED", "not needed")
    # Asked again, said again: each answer has an id of its own.
    await store.say_again([RunStateWanted(run_id=ended.run_id)], [None])
    async with store.connections.connection() as connection:
        count = await connection.fetchval("SELECT count(*) FROM outbox WHERE kind = 'RunEnded'")
    assert count == 3  # the cancel's, and one for each ask


async def test_who_may_not_submit_may_not_ask_about_a_run(store: Database) -> None:
    await store.submitters.register("op", "team-a", Limits())
    run = SubmitRun(run_id=uuid.uuid4(), image="img", command=("true",))
    await store.accept_submissions([run])
    ask = RunStateWanted(run_id=run.run_id)

    said = await store.say_again([ask, ask, ask], ["stranger", None, "team-a"], ["hd"])

    assert isinstance(said[0], str) and "'stranger' may not submit runs" in said[0]
    assert isinstance(said[1], str) and "must carry its sender's AMQP user_id" in said[1]
    assert said[2] == answers.Said.UNDER_WAY


async def test_a_limited_token_may_cancel_or_ask_about_only_runs_within_its_limits(
    store: Database,
) -> None:
    await store.submitters.register("op", "etl-only", Limits(queues=("etl",)))
    await store.submitters.register("op", "anywhere", Limits())
    mine = SubmitRun(run_id=uuid.uuid4(), image="img", command=("true",), queue="etl")
    other = SubmitRun(run_id=uuid.uuid4(), image="img", command=("true",), queue="default")
    await store.accept_submissions([mine, other], ["etl-only", "anywhere"])

    asked = await store.say_again(
        [RunStateWanted(run_id=r.run_id) for r in (other, mine)], ["etl-only", "etl-only"]
    )
    canceled = await store.cancel(
        [CancelRun(run_id=r.run_id) for r in (other, mine)], ["etl-only", "etl-only"]
    )

    assert isinstance(asked[0], str)
    assert "'etl-only' may ask about only runs on its queues (allowed: etl)" in asked[0]
    assert asked[1] == answers.Said.UNDER_WAY
    assert isinstance(canceled[0], str)
    assert "'etl-only' may cancel only runs on its queues" in canceled[0]
    assert not isinstance(canceled[1], str) and canceled[1].state == RunState.CANCELED
    # The other run goes on; a token without limits and a trusted identity reach it.
    assert (await store.runs.get(other.run_id)).state == RunState.QUEUED
    assert await store.say_again([RunStateWanted(run_id=other.run_id)], ["anywhere"]) == [
        answers.Said.UNDER_WAY
    ]
    [by_operator] = await store.cancel([CancelRun(run_id=other.run_id)], ["hd"], ["hd"])
    assert not isinstance(by_operator, str) and by_operator.state == RunState.CANCELED
    # Another's refusal is not told to a limited token (it names tokens and their limits).
    refused = SubmitRun(run_id=uuid.uuid4(), image="img", command=("true",), queue="gpu")
    await store.accept_submissions([refused], ["etl-only"])
    ask = RunStateWanted(run_id=refused.run_id)
    assert await store.say_again([ask], ["etl-only"]) == [answers.Said.UNKNOWN]
    assert await store.say_again([ask], ["anywhere"]) == [answers.Said.REFUSED]
