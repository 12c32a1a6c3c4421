"""The admitter: writes the LaunchRun of held runs once their concurrency limits have room.

Woken by a NOTIFY when a held run is created, a run ends or a limit changes; ``poll_s`` is a
safety net. Every ``serve`` with the relay runs one; they take turns on an advisory lock.
"""

from __future__ import annotations

import asyncio
import logging

from .errors import StoreUnavailable
from .store import Database

log = logging.getLogger(__name__)


class Admitter:
    def __init__(self, store: Database, batch: int = 1000, poll_s: float = 2.0) -> None:
        self._store = store
        self._batch = batch
        self._poll_s = poll_s

    async def run(self) -> None:
        """Admit until cancelled."""
        while True:
            try:
                async with self._store.listen_admissions() as wait_for_notify:
                    while True:
                        admitted = await self._store.admission.admit(self._batch)
                        if admitted:
                            log.info("admitted %d held run(s)", admitted)
                        if admitted < self._batch:
                            await wait_for_notify(self._poll_s)
            except StoreUnavailable as exc:
                log.error("admitter: %s; retrying in 1 s", exc)
                await asyncio.sleep(1.0)
