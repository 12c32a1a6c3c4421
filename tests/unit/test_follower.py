"""A Follower: one reader for every wait, a backlog for waits that start later, and each
run's last word kept past the backlog. The private queue is a stand-in that yields what the
test sends; the Follower and ``wait_for_outcome`` are the real ones."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator

import pytest

from dispatcher import client as client_module
from dispatcher.client import Follower, wait_for_outcome
from dispatcher.errors import VerdictUnreadable
from schemas import RunAccepted, RunEnded, RunLog, RunRejected, encode
from schemas.topology import CONTROL_SOURCE, event_routing_key
from tests.fakes.clock import until
from transport import subscription as subscription_module
from transport.errors import BrokerUnavailable
from transport.subscription import Received, Subscription

pytestmark = pytest.mark.unit


class Sent:
    """A private queue whose messages the test sends."""

    def __init__(self) -> None:
        self._incoming: asyncio.Queue[Received | None] = asyncio.Queue()
        self.closed = False

    def send(
        self, event: RunEnded | RunLog | RunAccepted | RunRejected, source: str | None = None
    ) -> None:
        self._incoming.put_nowait(Received(event_routing_key(event, source), encode(event)))

    async def messages(self) -> AsyncGenerator[Received, None]:
        while (received := await self._incoming.get()) is not None:
            yield received

    async def bind(self, exchange: str, routing_key: str) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


def ended(run_id: uuid.UUID) -> RunEnded:
    return RunEnded(run_id=run_id, attempt=1, state="SUCCESS", exit_code=0)


async def test_a_run_s_end_is_found_by_a_wait_that_starts_after_the_backlog_moved_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Follower, "BACKLOG", 5)
    queue = Sent()
    follower = Follower(queue, set())  # type: ignore[arg-type]
    first, chatty = uuid.uuid4(), uuid.uuid4()
    for run_id in (first, chatty):
        await follower.add(run_id)
    started = asyncio.create_task(wait_for_outcome(follower, chatty, 5))  # reading begins
    await asyncio.sleep(0)
    queue.send(ended(first), CONTROL_SOURCE)
    for n in range(20):  # the other run's output: not kept, and it moves nothing out
        queue.send(RunLog(run_id=chatty, attempt=1, agent_id="a1", first_line=n, lines=("x",)))
    for _ in range(10):  # more last words of other runs push the first one out of the backlog
        other = uuid.uuid4()
        queue.send(ended(other), CONTROL_SOURCE)
    queue.send(ended(chatty), CONTROL_SOURCE)
    assert (await started).state == "SUCCESS"
    late = await wait_for_outcome(follower, first, 5)
    assert (late.run_id, late.state) == (first, "SUCCESS")
    await follower.close()
    assert queue.closed


async def test_a_wait_after_close_ends_at_once_and_close_keeps_a_cancel_of_its_caller() -> None:
    queue = Sent()
    follower = Follower(queue, {uuid.uuid4()})  # type: ignore[arg-type]
    run_id = next(iter(follower.run_ids))
    waiting = asyncio.create_task(wait_for_outcome(follower, run_id, 5))
    await asyncio.sleep(0)
    closing = asyncio.create_task(follower.close())
    await asyncio.sleep(0)  # close has cancelled the reader and waits for it to go
    closing.cancel()  # the caller of close is cancelled meanwhile: it stays cancelled
    with pytest.raises(asyncio.CancelledError):
        await closing
    await follower.close()
    with pytest.raises(Exception, match="the status stream ended"):
        await waiting
    with pytest.raises(Exception, match="the status stream ended"):
        await wait_for_outcome(follower, run_id, 5)


async def test_after_a_loss_the_runs_not_ended_are_asked_about_until_each_ask_is_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_module, "ASK_RETRY_S", 0.01)
    queue = Sent()
    asked: list[uuid.UUID] = []
    failures = [BrokerUnavailable("away")]

    async def ask(run_id: uuid.UUID) -> None:
        if failures:
            raise failures.pop()
        asked.append(run_id)

    done, refused, going = sorted(uuid.uuid4() for _ in range(3))
    follower = Follower(queue, {done, refused, going}, ask=ask)  # type: ignore[arg-type]
    reading = asyncio.create_task(wait_for_outcome(follower, going, 5))
    await asyncio.sleep(0)
    queue.send(ended(done), CONTROL_SOURCE)
    queue.send(RunRejected(run_id=refused, reason="no"), CONTROL_SOURCE)
    # An acceptance said again after the end it preceded does not hide the end.
    queue.send(RunAccepted(run_id=done), CONTROL_SOURCE)
    await asyncio.sleep(0.01)

    follower.missed()
    # The first ask failed and was sent again; runs with their last word are not asked.
    await until(lambda: asked == [going], what="the ask sent again")
    assert not failures
    # A second loss asks again; close stops a round still under way.
    follower.missed()
    follower.missed()  # replaces the round before
    await until(lambda: asked == [going, going], what="the second round's ask")
    queue.send(ended(going), CONTROL_SOURCE)
    assert (await reading).state == "SUCCESS"
    late = await wait_for_outcome(follower, done, 5)
    assert late.state == "SUCCESS"
    await follower.close()
    follower.missed()  # closed: nothing more
    await asyncio.sleep(0.05)
    assert asked == [going, going]


async def test_a_round_of_asks_is_stopped_by_close_and_replaced_by_the_next_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_module, "ASK_RETRY_S", 0.01)
    tries: list[uuid.UUID] = []

    async def never(run_id: uuid.UUID) -> None:
        tries.append(run_id)
        raise BrokerUnavailable("away")

    follower = Follower(Sent(), {uuid.uuid4()}, ask=never)  # type: ignore[arg-type]
    follower.missed()
    await until(lambda: len(tries) >= 2, what="the ask tried again")
    follower.missed()
    await asyncio.sleep(0)
    assert sum(not task.done() for task in follower._asking) == 1  # one round at a time
    await follower.close()
    await asyncio.sleep(0)
    assert all(task.done() for task in follower._asking)
    count = len(tries)
    assert count >= 2  # tried again while it failed
    await asyncio.sleep(0.05)
    assert len(tries) == count  # and not after the close


class _Connection:
    is_closed = False


class _Channel:
    is_closed = True  # the connection is away: the channel is not open

    def __init__(self) -> None:
        self.closes = 0

    async def close(self) -> None:
        self.closes += 1


class _Queue:
    name = "amq_private"

    async def consume(self, callback: object, no_ack: bool = False) -> str:
        raise ConnectionError("the connection is away")


async def test_a_subscription_whose_broker_stays_away_ends_in_words_and_a_closed_one_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(subscription_module, "WATCH_S", 0.01)
    monkeypatch.setattr(subscription_module, "RETRY_S", 0.01)
    away = Subscription(_Connection(), _Channel(), _Queue())  # type: ignore[arg-type]
    with pytest.raises(BrokerUnavailable, match=r"lost for 0\.2 s"):
        async for _ in away.messages(gone_after_s=0.2):
            pass
    # A connection closed by its owner ends the messages, without an error.
    closed = _Connection()
    subscription = Subscription(closed, _Channel(), _Queue())  # type: ignore[arg-type]
    closed.is_closed = True
    assert [m async for m in subscription.messages(gone_after_s=60)] == []
    # Closed while its connection is away, its channel is closed all the same (else it
    # would be restored with the connection), and its messages end at once from then on.
    channel = _Channel()
    away = Subscription(_Connection(), channel, _Queue())  # type: ignore[arg-type]
    await away.close()
    assert channel.closes == 1
    assert [m async for m in away.messages(gone_after_s=60)] == []


async def test_a_verdict_this_client_cannot_read_ends_its_wait_in_words() -> None:
    """A newer control plane's RunEnded (a reason this release does not know) ends the wait,
    saying so, where it was skipped and the wait went on for ever."""
    queue = Sent()
    follower = Follower(queue, set())  # type: ignore[arg-type]
    run_id = uuid.uuid4()
    await follower.add(run_id)
    newer = json.loads(encode(RunEnded(run_id=run_id, attempt=1, state="FAILURE")))
    newer["reason"] = "DISK_FULL"
    body = json.dumps(newer).encode()
    # From anyone but the control plane, it is no verdict: skipped.
    queue._incoming.put_nowait(Received(f"run.ended.a1.{run_id}", body))
    waiting = asyncio.create_task(wait_for_outcome(follower, run_id, 5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    queue._incoming.put_nowait(Received(f"run.ended.{CONTROL_SOURCE}.{run_id}", body))
    with pytest.raises(VerdictUnreadable, match=rf"run {run_id} ended, but this client cannot"):
        await waiting
    # A wait that starts later is told the same.
    with pytest.raises(VerdictUnreadable, match="DISK_FULL"):
        await wait_for_outcome(follower, run_id, 5)
    await follower.close()
