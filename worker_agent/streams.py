"""Long-lived Docker streams (the events, a container's output), each on a thread of its own.

A stream holds the thread that reads it for as long as it lasts: a container's whole life for
its output, the agent's whole life for the events. On a shared pool, every short Docker call
(create, inspect, output tail) would queue behind such streams, and exits would be reported
late enough for the monitor to think the runs vanished. So each stream is read on a dedicated
daemon thread, which hands what it reads to the event loop and ends with the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import docker
import docker.errors
import requests.exceptions

from .errors import DockerUnavailable

log = logging.getLogger(__name__)

#: What a broken connection to the engine raises from inside docker-py.
UNAVAILABLE = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, OSError)


class Stream(Protocol):
    """A blocking stream: iterated on one thread, closed from any other."""

    def __iter__(self) -> Iterator[Any]: ...

    def close(self) -> None: ...


class EventStream:
    """A streaming Docker response (events, output); ``close()`` from any thread ends it."""

    def __init__(self, client: docker.DockerClient, stream: Any) -> None:
        self._client = client
        self._stream = stream

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._stream
        except (docker.errors.DockerException, *UNAVAILABLE) as exc:
            raise DockerUnavailable(f"a Docker stream broke: {exc}") from exc

    def close(self) -> None:
        """End the stream and release its connection; safe more than once."""
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        finally:
            self._client.close()


async def read_on_thread(stream: Stream, on_item: Callable[[Any], None], name: str) -> None:
    """Read ``stream`` on a daemon thread of its own until it ends.

    ``on_item`` is called on the event loop, in order, for every item. Errors of the stream
    are raised here once it ended. Cancelling this closes the stream, which ends the thread.
    """
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if ended.done():
            return
        if error is None:
            ended.set_result(None)
        else:
            ended.set_exception(error)

    def read() -> None:
        error: BaseException | None = None
        try:
            for item in stream:
                loop.call_soon_threadsafe(on_item, item)
        except Exception as exc:
            error = exc
        finally:
            with contextlib.suppress(Exception):
                stream.close()
            # After the last item: callbacks run in the order they were scheduled. The loop
            # may be closed already at exit; then nobody waits for this any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=read, name=name, daemon=True).start()
    try:
        await ended
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            stream.close()
        raise
