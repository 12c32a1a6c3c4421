"""``/api/v1/events``: run events as Server-Sent Events, read from PostgreSQL's event sequence.

Each event's SSE id is its ``run_events.seq``: a client that reconnects with ``Last-Event-ID``
(browsers do it by themselves) gets every event after it, from the table, so a restart of the
web process loses nothing. Sequence numbers are taken when a transaction inserts and become
visible when it commits, so a later number can be seen before an earlier one: the stream
stops at a gap and waits for it to fill (``gap_wait_s``; a rolled-back insert leaves a gap
that never fills), so it never skips an event that commits late.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
from litestar.response.sse import ServerSentEventMessage

from ..store import Database
from . import views

#: Keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0


class EventStream:
    def __init__(
        self,
        store: Database,
        after: int,
        run_id: uuid.UUID | None = None,
        poll_s: float = 0.2,
        gap_wait_s: float = 2.0,
    ) -> None:
        self._store = store
        self._after = after
        self._run_id = run_id
        self._poll_s = poll_s
        self._gap_wait_s = gap_wait_s

    async def frames(self) -> AsyncIterator[ServerSentEventMessage]:
        """SSE frames (``id``, ``event``, ``data``), forever; a comment line as keep-alive."""
        horizon = self._after  # every event up to here is visible
        gap_since: float | None = None
        quiet_since = time.monotonic()
        while True:
            for seq in await self._store.runs.sequence_after(horizon):
                if seq != horizon + 1:
                    gap_since = gap_since or time.monotonic()
                    if time.monotonic() - gap_since < self._gap_wait_s:
                        break
                gap_since = None
                horizon = seq
            sent = False
            while self._after < horizon:
                rows = await self._store.runs.events_after(self._after, self._run_id, horizon)
                if not rows:
                    self._after = horizon
                    break
                for run_id, event in rows:
                    self._after = event.seq
                    body = msgspec.json.encode(views.event_view(run_id, event)).decode()
                    yield ServerSentEventMessage(data=body, event=event.kind, id=event.seq)
                sent = True
            if sent:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ServerSentEventMessage(comment="keep-alive")
            await asyncio.sleep(self._poll_s)
