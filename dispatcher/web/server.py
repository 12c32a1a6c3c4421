"""Serving the application with uvicorn inside a process that owns its signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from transport.process import unless_stopped

from ..client import Client
from ..errors import ConfigError
from ..settings import WebSettings
from ..store import Database
from .app import API, create_app, opened

log = logging.getLogger(__name__)

#: How long requests under way (an event stream, say) have to end once the server stops.
SHUTDOWN_GRACE_S = 5


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The process's own handlers set ``stop``; uvicorn must not take SIGTERM from them.
        yield


def listening(settings: WebSettings) -> list[socket.socket]:
    """The server's sockets, bound here, one per address of its host (``localhost``: IPv4
    and IPv6), on one port: an address in use or a host that is no host is this process's
    error, said in one line (uvicorn would end the whole process instead)."""
    bound: list[socket.socket] = []
    try:
        addresses = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        port = settings.port
        for family, host in dict.fromkeys((a[0], str(a[4][0])) for a in addresses):
            bound.append(socket.create_server((host, port), family=family))
            port = port or bound[-1].getsockname()[1]  # port 0: the first one's, for all
    except (OSError, UnicodeError) as exc:  # UnicodeError: a host no name encodes
        for sock in bound:
            sock.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        host = settings.host if settings.host.isprintable() else repr(settings.host)
        raise ConfigError(
            f"the web server cannot listen on {host}:{settings.port}: {why}"
        ) from None
    return bound


async def serve_web(settings: WebSettings, stop: asyncio.Event) -> None:
    """Serve the HTTP API until ``stop`` is set; fails if the server cannot start or dies.

    The store and the broker are reached first: one that cannot be is this process's error,
    said in one line, not a failed start-up inside the server."""
    async with contextlib.AsyncExitStack() as stack:
        # Gives way to a stop: a SIGTERM while the broker or the database does not answer.
        connected = await unless_stopped(stop, stack.enter_async_context(opened(settings)))
        await _serve(settings, connected, stop)


async def _serve(
    settings: WebSettings, connected: tuple[Database, Client], stop: asyncio.Event
) -> None:
    config = uvicorn.Config(
        create_app(settings, connected),
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        # An event stream (``/api/v1/events``) open at the stop would hold it for ever.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve(sockets=listening(settings)), name="uvicorn")
    stopping = asyncio.create_task(stop.wait(), name="web-stop")
    # uvicorn says it started only through this flag.
    while not server.started and not serving.done():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if server.started:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        log.info("HTTP API on http://%s:%d%s", host, port, API)
    await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopping.cancel()
    try:
        await serving
    except SystemExit:
        raise ConfigError(
            f"the web server could not listen on {settings.host}:{settings.port}"
        ) from None
    if not stop.is_set():
        raise ConfigError("the web server stopped (see the error above)")
