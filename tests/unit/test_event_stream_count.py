"""The web process counts its open event streams (``Wakeups.counted``): a stream counts from
its first frame until it ends or its client goes, so the cap on them frees up again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dispatcher.web.sse import Wakeups

pytestmark = pytest.mark.unit


async def forever() -> AsyncIterator[str]:
    while True:
        yield "frame"
        await asyncio.sleep(0)


async def test_a_stream_counts_while_it_is_read_and_not_once_its_client_is_gone() -> None:
    wakeups = Wakeups()
    first, second = wakeups.counted(forever()), wakeups.counted(forever())  # type: ignore[arg-type]
    assert wakeups.streams == 0
    assert await anext(first) == "frame"
    assert await anext(second) == "frame"
    assert wakeups.streams == 2
    await first.aclose()  # the client went away
    assert wakeups.streams == 1
    reading = asyncio.create_task(anext(second))
    await asyncio.sleep(0)
    reading.cancel()  # the server cancels a response whose client is gone
    with pytest.raises((asyncio.CancelledError, StopAsyncIteration)):
        await reading
    await second.aclose()
    assert wakeups.streams == 0


async def test_a_stream_past_the_cap_ends_at_once_and_the_cap_frees_up() -> None:
    wakeups = Wakeups(max_streams=1)
    first = wakeups.counted(forever())  # type: ignore[arg-type]
    assert await anext(first) == "frame"
    late = wakeups.counted(forever())  # type: ignore[arg-type]
    with pytest.raises(StopAsyncIteration):
        await anext(late)
    await first.aclose()
    again = wakeups.counted(forever())  # type: ignore[arg-type]
    assert await anext(again) == "frame"
    assert wakeups.streams == 1
    await again.aclose()


async def test_one_token_s_streams_are_capped_and_others_still_open() -> None:
    wakeups = Wakeups(max_streams=10, max_per_token=2)
    mine = [wakeups.counted(forever(), "script") for _ in range(2)]  # type: ignore[arg-type]
    for stream in mine:
        assert await anext(stream) == "frame"
    assert wakeups.refusal("script") == (
        "the token 'script' has 2 event streams open on this process: close one first"
    )
    late = wakeups.counted(forever(), "script")  # type: ignore[arg-type]
    with pytest.raises(StopAsyncIteration):
        await anext(late)
    assert wakeups.refusal("viewer") is None
    theirs = wakeups.counted(forever(), "viewer")  # type: ignore[arg-type]
    assert await anext(theirs) == "frame"
    await mine[0].aclose()
    assert wakeups.refusal("script") is None
    for stream in (mine[1], theirs):
        await stream.aclose()
    assert wakeups.streams == 0
