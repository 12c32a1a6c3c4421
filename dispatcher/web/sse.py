"""``/api/v1/events``: run events as Server-Sent Events, read from PostgreSQL's event sequence.

Each event's SSE id is its ``run_events.seq``: a client that reconnects with ``Last-Event-ID``
(browsers do it by themselves) gets every event after it, from the table, so a restart of the
web process loses nothing. Sequence numbers are taken when a transaction inserts and become
visible when it commits, so a later number can be seen before an earlier one: the stream
stops at a gap until it fills, or until it is sure it never will (see ``frames``). A stream
ends when its token is revoked or its session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
from litestar.response.sse import ServerSentEventMessage

from ..errors import StoreUnavailable
from ..store import Database
from ..submitters import ANYWHERE, Limits
from . import views

log = logging.getLogger(__name__)

#: Keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0
#: How often an open stream checks that its token or session still stands.
RECHECK_S = 5.0
#: NOTIFY channel of run events being stored (migration 14's trigger).
RUN_EVENTS_CHANNEL = "hd_run_events"


class Wakeups:
    """One LISTEN of the web process, rung to every stream at each NOTIFY of new events."""

    def __init__(self, max_streams: int = 256, max_per_token: int = 16) -> None:
        self._event = asyncio.Event()
        #: Streams open now (``counted``), and how many may be: in all, and of one token
        #: (one token's scripts must not take every stream from everyone else's pages).
        self.streams = 0
        self.max_streams = max_streams
        self.max_per_token = max_per_token
        self._of: Counter[str] = Counter()

    def refusal(self, token: str) -> str | None:
        """Why one more stream of ``token`` may not open now, or None."""
        if self.streams >= self.max_streams:
            return f"{self.max_streams} event streams are open on this process: try again later"
        if self._of[token] >= self.max_per_token:
            return (
                f"the token {token!r} has {self.max_per_token} event streams open on this "
                "process: close one first"
            )
        return None

    async def counted(
        self, frames: AsyncIterator[ServerSentEventMessage], token: str = ""
    ) -> AsyncIterator[ServerSentEventMessage]:
        """``frames``, counted in ``streams`` (and ``token``'s) from the first to the last
        (or the client gone); a stream past a cap ends at once (requests that came together
        may all have passed the handler's check before any of them counted)."""
        if self.refusal(token) is not None:
            return
        self.streams += 1
        self._of[token] += 1
        try:
            async for frame in frames:
                yield frame
        finally:
            self.streams -= 1
            self._of[token] -= 1
            if not self._of[token]:
                del self._of[token]

    def ring(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Until the next ring, or ``timeout``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)

    async def run(self, store: Database) -> None:
        """Listen until cancelled; a lost connection is opened again (streams still poll)."""
        while True:
            try:
                async with store.connections.listen(RUN_EVENTS_CHANNEL) as notified:
                    while True:
                        await notified(5.0)
                        self.ring()
            except StoreUnavailable as exc:
                log.warning("event streams: %s; listening again in 1 s", exc)
                await asyncio.sleep(1.0)


async def _always() -> bool:
    return True


class EventStream:
    def __init__(
        self,
        store: Database,
        wakeups: Wakeups,
        after: int,
        run_id: uuid.UUID | None = None,
        poll_s: float = 1.0,
        gap_wait_s: float = 2.0,
        allowed: Callable[[], Awaitable[bool]] | None = None,
        within: Limits = ANYWHERE,
        env: bool = False,
    ) -> None:
        self._allowed = allowed or _always
        #: The token's limits (only those runs' events) and whether it sees env values.
        self._within = within
        self._env = env
        self._store = store
        self._wakeups = wakeups
        self._after = after
        self._run_id = run_id
        self._poll_s = poll_s
        self._gap_wait_s = gap_wait_s

    async def frames(self) -> AsyncIterator[ServerSentEventMessage]:
        """SSE frames (``id``, ``event``, ``data``), forever; a comment line as keep-alive."""
        horizon = self._after  # every event up to here is visible
        quiet_since = checked = time.monotonic()
        while True:
            if time.monotonic() - checked > RECHECK_S:
                checked = time.monotonic()
                if not await self._allowed():
                    return  # the token was revoked, or the session ended
            visible, quiet = await self._store.runs.sequence_after(horizon)
            for seq, age_s in visible:
                # A gap is final when no other transaction is open, or when the row after
                # it is older than gap_wait_s: the number was taken before that row's, so
                # its transaction has been open that long, or it rolled back.
                if seq != horizon + 1 and not quiet and age_s < self._gap_wait_s:
                    break
                horizon = seq
            sent = False
            while self._after < horizon:
                rows = await self._store.runs.events_after(
                    self._after, self._run_id, horizon, within=self._within
                )
                if not rows:
                    self._after = horizon
                    break
                for run_id, event in rows:
                    self._after = event.seq
                    body = msgspec.json.encode(views.event_view(run_id, event, self._env)).decode()
                    yield ServerSentEventMessage(data=body, event=event.kind, id=event.seq)
                sent = True
            if sent:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ServerSentEventMessage(comment="keep-alive")
            # A gap fills when its transaction commits, which rings too; the poll is a net.
            await self._wakeups.wait(self._poll_s)
