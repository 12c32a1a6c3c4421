"""Docker calls never wait behind long-lived streams: the runtime's pool and stream threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from worker_agent.agent import Agent
from worker_agent.runtime import DockerRuntime
from worker_agent.settings import AgentSettings
from worker_agent.streams import read_on_thread

pytestmark = pytest.mark.unit


class BlockingStream:
    """A stream that yields ``items`` then blocks, as a container's output does, until closed."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.closed = threading.Event()
        self.started = threading.Event()
        self.thread: threading.Thread | None = None

    def __iter__(self) -> Iterator[Any]:
        self.thread = threading.current_thread()
        self.started.set()
        yield from self.items
        self.closed.wait(timeout=30)

    def close(self) -> None:
        self.closed.set()


def saturate_default_executor() -> tuple[threading.Event, list[asyncio.Future[bool]]]:
    """Occupy every thread of asyncio's default executor (and more) until released."""
    release = threading.Event()
    loop = asyncio.get_running_loop()
    busy = [loop.run_in_executor(None, release.wait, 30) for _ in range(64)]
    return release, busy


def test_the_runtime_pool_is_sized_from_the_slots() -> None:
    for slots, threads in [(1, 8), (4, 8), (20, 24), (60, 64)]:
        settings = AgentSettings(amqp_url="amqp://x/", agent_id="a1", max_concurrent=slots)
        agent = Agent(settings)
        try:
            assert agent.runtime.threads == threads
        finally:
            agent.runtime.close()


async def test_short_calls_run_on_the_runtime_s_own_threads_all_at_once() -> None:
    runtime = DockerRuntime("a1", threads=12)
    release, busy = saturate_default_executor()
    try:
        # Twelve calls that can only finish together: all must run at the same time, on the
        # runtime's threads, although the default executor has no thread free.
        barrier = threading.Barrier(12, timeout=10)

        def call() -> str:
            barrier.wait()
            return threading.current_thread().name

        names = await asyncio.wait_for(
            asyncio.gather(*(runtime.run_blocking(call) for _ in range(12))), 15
        )
        assert all(name.startswith("docker") for name in names)
        assert len(set(names)) == 12
    finally:
        release.set()
        await asyncio.gather(*busy)
        runtime.close()


async def test_a_stream_is_read_on_a_daemon_thread_of_its_own() -> None:
    release, busy = saturate_default_executor()
    stream = BlockingStream(["a", "b", "c"])
    seen: list[str] = []
    all_seen = asyncio.Event()

    def on_item(item: str) -> None:
        seen.append(item)
        if len(seen) == 3:
            all_seen.set()

    try:
        reader = asyncio.create_task(read_on_thread(stream, on_item, "test-stream"))
        await asyncio.wait_for(all_seen.wait(), 10)
        assert seen == ["a", "b", "c"]
        assert stream.thread is not None
        assert stream.thread.daemon
        assert stream.thread.name == "test-stream"
        # Closing ends the stream, the thread and the reader.
        stream.close()
        await asyncio.wait_for(reader, 10)
        stream.thread.join(timeout=10)
        assert not stream.thread.is_alive()
    finally:
        release.set()
        await asyncio.gather(*busy)


async def test_cancelling_the_reader_closes_the_stream() -> None:
    stream = BlockingStream([])
    reader = asyncio.create_task(read_on_thread(stream, lambda _: None, "test-stream"))
    assert await asyncio.to_thread(stream.started.wait, 10)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert stream.closed.is_set()
    stream.thread.join(timeout=10)
    assert not stream.thread.is_alive()


async def test_a_broken_stream_raises_in_the_reader() -> None:
    class Broken(BlockingStream):
        def __iter__(self) -> Iterator[Any]:
            yield "first"
            raise OSError("engine gone")

    seen: list[str] = []
    with pytest.raises(OSError, match="engine gone"):
        await read_on_thread(Broken([]), seen.append, "test-stream")
    assert seen == ["first"]
