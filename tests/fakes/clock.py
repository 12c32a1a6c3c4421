"""A clock that moves only when told, and waiting on a condition instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class ManualClock:
    """``transport.ports.Clock``: the time is ``now`` until ``advance`` moves it."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.now += seconds


async def until(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Return once ``condition()`` is true; fail after ``timeout`` s (real time): a bound on
    what must happen, so generous, for a loaded machine (a pass costs no more)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or condition}")
        await asyncio.sleep(0.002)
