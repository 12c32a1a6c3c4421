"""A Follower: one reader for every wait, a backlog for waits that start later, and each
run's last word kept past the backlog. The private queue is a stand-in that yields what the
test sends; the Follower and ``wait_for_outcome`` are the real ones."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator

import pytest

from dispatcher.client import Follower, wait_for_outcome
from schemas import RunEnded, RunLog, encode
from schemas.topology import CONTROL_SOURCE, event_routing_key
from transport.subscription import Received

pytestmark = pytest.mark.unit


class Sent:
    """A private queue whose messages the test sends."""

    def __init__(self) -> None:
        self._incoming: asyncio.Queue[Received | None] = asyncio.Queue()
        self.closed = False

    def send(self, event: RunEnded | RunLog, source: str | None = None) -> None:
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
