"""A broker node that goes silent without closing its sockets (a host lost, a cut network):
the connection takes it for lost by the AMQP heartbeat the project asks for, and moves on to
the next node of its list."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
import uuid

import pytest

from tests.support import eventually
from transport.connection import connect
from transport.topology import declare_consumed_queue
from transport.urls import where_of

pytestmark = pytest.mark.timeout(300)


class SilentRelay:
    """A TCP relay to the broker that can go silent: it stops passing bytes either way and
    keeps every socket open, as a vanished host does."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._silent = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def go_silent(self) -> None:
        self._silent.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if self._silent.is_set():
                    await asyncio.Event().wait()  # hold the bytes and the socket, for ever
                sink.write(data)
                await sink.drain()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()


async def test_a_node_gone_silent_is_left_for_the_next_within_a_minute(vhost_url: str) -> None:
    direct = urllib.parse.urlsplit(vhost_url)
    relay = SilentRelay(direct.hostname or "127.0.0.1", direct.port or 5672)
    await relay.start()
    login = direct.netloc.rpartition("@")[0]
    through_relay = direct._replace(
        netloc=f"{login}@127.0.0.1:{relay.port}" if login else f"127.0.0.1:{relay.port}"
    ).geturl()
    # No heartbeat in either URL: the project's default applies.
    connection = await connect(f"{through_relay},{vhost_url}", "test-silent-node")
    try:
        assert connection.node == f"127.0.0.1:{relay.port}"
        relay.go_silent()

        async def moved_on() -> bool:
            return connection.node == where_of(vhost_url) and bool(connection.connected.is_set())

        # aiormq's own heartbeat (60 s) would take the node for lost after 183 s.
        await eventually(moved_on, timeout=90, interval=0.5, what="a failover to the next node")

        # And it works there.
        async with connection.channel() as channel:
            queue = await declare_consumed_queue(channel, f"hd.silent-{uuid.uuid4().hex[:8]}")
            await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
        await relay.close()
