"""Whether the agent's Docker engine answers, asked every interval.

A frozen engine (its dockerd stopped, or hung) does not refuse calls: they wait for their
timeout. So the agent pings it on a thread of its own with a short timeout, says the result in
every heartbeat (``engine_ok``), and takes no new work while the engine does not answer: the
failure monitor treats an engine silent past its loss threshold like a lost agent, and the
runs fail over to other hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class EngineHealth:
    """Pings the engine every ``interval_s``; a ping not answered in ``timeout_s`` (or
    failing) makes it unhealthy until one is answered again."""

    def __init__(
        self,
        ping: Callable[[], object],
        interval_s: float,
        timeout_s: float,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._ping = ping
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._on_change = on_change
        self.ok = True
        #: Why it is unhealthy, in words ("" while it answers).
        self.error = ""

    def _set(self, ok: bool, error: str) -> None:
        changed = ok != self.ok
        self.ok, self.error = ok, error
        if changed:
            if ok:
                log.warning("the Docker engine answers again")
            else:
                log.error("the Docker engine does not answer: %s", error)
            if self._on_change is not None:
                self._on_change()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # One thread: a ping that hangs is waited for, never piled up behind.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-ping")
        pending: asyncio.Future[object] | None = None
        try:
            while True:
                if pending is None or pending.done():
                    pending = loop.run_in_executor(executor, self._ping)
                try:
                    await asyncio.wait_for(asyncio.shield(pending), self.timeout_s)
                except TimeoutError:
                    self._set(False, f"no answer to a ping in {self.timeout_s:g} s")
                except Exception as exc:
                    self._set(False, f"{type(exc).__name__}: {exc}"[:500])
                else:
                    self._set(True, "")
                await asyncio.sleep(self.interval_s)
        finally:
            if pending is not None:
                pending.cancel()
            with contextlib.suppress(Exception):
                executor.shutdown(wait=False, cancel_futures=True)
