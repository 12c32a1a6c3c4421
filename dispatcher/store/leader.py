"""A leader lock: a session-level advisory lock on a connection of its own, held while it lives."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

import asyncpg

from ..errors import StoreUnavailable
from .connections import UNAVAILABLE, close_quietly, connect

log = logging.getLogger(__name__)


class LeadershipLost(StoreUnavailable):
    """The leader lock's session ended (PostgreSQL restarted, say): stop acting."""


class Leadership:
    """One holder at a time per name; the others wait as standbys."""

    def __init__(self, dsn: str, name: str) -> None:
        self._dsn = dsn
        self._key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self._connection: asyncpg.Connection | None = None

    async def acquire(self, poll_s: float, stop: asyncio.Event) -> bool:
        """Wait until this process leads (True) or ``stop`` is set (False)."""
        announced = False
        while not stop.is_set():
            try:
                if self._connection is None or self._connection.is_closed():
                    self._connection = await connect(self._dsn)
                if await self._connection.fetchval("SELECT pg_try_advisory_lock($1)", self._key):
                    return True
            except (StoreUnavailable, *UNAVAILABLE, asyncpg.PostgresError) as exc:
                log.warning("cannot reach PostgreSQL for the leader lock: %r", exc)
                self._connection = None
            if not announced:
                log.info("another process holds the leader lock; standing by")
                announced = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)
        return False

    async def watch(self, every_s: float = 1.0) -> None:
        """Return (raise) as soon as the lock's session is gone: leadership is lost."""
        while True:
            await asyncio.sleep(every_s)
            try:
                assert self._connection is not None
                await self._connection.fetchval("SELECT 1", timeout=5)
            except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                raise LeadershipLost(f"leader lock lost: {exc!r}") from exc

    async def release(self) -> None:
        """Let go of the lock (by ending its session)."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await close_quietly(self._connection)
        self._connection = None
