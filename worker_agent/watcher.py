"""The container watcher: Docker's events stream, so that an exit is seen within milliseconds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import DockerUnavailable
from .ports import ContainerRuntime
from .streams import Stream, read_on_thread

log = logging.getLogger(__name__)


class ContainerWatcher:
    """Calls ``on_exit(container_id)`` for every exit of this agent's containers, and
    ``on_healthy(container_id)`` when one passes its ready check.

    Each time the stream (re)opens, ``on_resync`` runs first, so that an exit that happened
    while nobody was watching (engine restart, agent restart) is still reported. The stream is
    read on a thread of its own: an exit is handed to the loop the moment Docker sends it.
    """

    def __init__(
        self,
        runtime: ContainerRuntime,
        on_exit: Callable[[str], None],
        on_resync: Callable[[], Awaitable[None]],
        on_healthy: Callable[[str], None],
    ) -> None:
        self._runtime = runtime
        self._on_exit = on_exit
        self._on_healthy = on_healthy
        self._on_resync = on_resync
        self._stream: Stream | None = None
        self._closed = False
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Watch until closed, opening the stream again whenever it breaks."""
        since = int(time.time()) - 1
        delay = 0.5
        while not self._closed:
            try:
                self._stream = await self._runtime.open_events(since)
                if self._closed:
                    self._stream.close()
                    return
                await self._on_resync()
                self.connected.set()
                delay = 0.5
                await read_on_thread(self._stream, self._dispatch, "docker-events")
                if self._closed:
                    return
                # The engine ended the stream (it stopped, say): watch again from here.
                log.warning("the Docker events stream ended; watching again")
            except DockerUnavailable as exc:
                if self._closed:
                    return
                log.error("Docker engine unreachable (%s); watching again in %.1f s", exc, delay)
            self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            since = int(time.time()) - 1

    def _dispatch(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        action = event.get("Action") or event.get("status") or ""
        container_id = event.get("id") or event.get("Actor", {}).get("ID")
        if not container_id:
            return
        if action == "die":
            self._on_exit(container_id)
        elif action.replace(" ", "") == "health_status:healthy":
            self._on_healthy(container_id)

    def close(self) -> None:
        """Stop watching; safe to call more than once and before ``run``."""
        self._closed = True
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception as exc:  # the stream may already be broken
                log.debug("closing the events stream: %r", exc)
            self._stream = None
