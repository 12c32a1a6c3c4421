"""Serving the application with uvicorn inside a process that owns its signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn

from ..errors import ConfigError
from ..settings import WebSettings
from .app import API, create_app

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The process's own handlers set ``stop``; uvicorn must not take SIGTERM from them.
        yield


async def serve_web(settings: WebSettings, stop: asyncio.Event) -> None:
    """Serve the HTTP API until ``stop`` is set; fails if the server cannot start or dies."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_level="warning",
        access_log=False,
        proxy_headers=False,
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve(), name="uvicorn")
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
