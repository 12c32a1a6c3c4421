"""Claims: an attempt is started only once the control plane says this agent holds it.

The agent publishes ``RunClaimed`` while it creates the attempt's container and starts the
container only on ``LaunchGranted``. The control plane records the first claim of an
attempt; any other claimant is answered with a ``TerminateRun`` instead. So a ``LaunchRun``
that reaches two agents (redelivered after a crash between start and ack, or published twice)
starts one container, on one engine.
"""

from __future__ import annotations

import asyncio
import contextlib

from .slots import AttemptKey


class Claims:
    """The claims waiting for their answer, one future per attempt."""

    def __init__(self) -> None:
        self._waiting: dict[AttemptKey, asyncio.Future[bool]] = {}

    def open(self, key: AttemptKey) -> asyncio.Future[bool]:
        """The answer to come for ``key`` (the same future while it waits)."""
        future = self._waiting.get(key)
        if future is None:
            future = self._waiting[key] = asyncio.get_running_loop().create_future()
        return future

    def answer(self, key: AttemptKey, granted: bool) -> bool:
        """Settle the claim of ``key``; False when none waits (a late or repeated answer)."""
        future = self._waiting.get(key)
        if future is None or future.done():
            return False
        future.set_result(granted)
        return True

    def close(self, key: AttemptKey) -> None:
        future = self._waiting.pop(key, None)
        if future is not None and not future.done():
            future.cancel()

    async def wait(self, key: AttemptKey, timeout_s: float, stopping: asyncio.Event) -> bool | None:
        """The answer for ``key``: True granted, False refused, None when ``timeout_s`` passed
        or the agent began to stop first."""
        future = self.open(key)
        stop: asyncio.Future[object] = asyncio.ensure_future(stopping.wait())
        waiting: set[asyncio.Future[object]] = {future, stop}  # type: ignore[arg-type]
        try:
            await asyncio.wait(waiting, timeout=timeout_s, return_when="FIRST_COMPLETED")
        finally:
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop
        return future.result() if future.done() and not future.cancelled() else None
