"""The outbox relay: publishes what the store committed, woken by LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aio_pika.abc

from .amqp import Publisher, declare_instructions_queue
from .errors import BrokerUnavailable, StoreUnavailable
from .store import OutboxRow, Store

log = logging.getLogger(__name__)


class OutboxRelay:
    """Publishes unsent outbox rows with confirms, then marks them sent.

    It starts with whatever was left unsent (a crash loses nothing), then sleeps until a
    NOTIFY from a committing transaction wakes it; ``idle_poll_s`` is only a safety net.
    """

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        batch: int = 500,
        idle_poll_s: float = 5.0,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._batch = batch
        self._idle_poll_s = idle_poll_s
        self._declared: set[str] = set()
        self.published = 0

    async def run(self) -> None:
        """Relay until cancelled."""
        while True:
            try:
                async with self._store.listen_outbox() as wait_for_notify:
                    while True:
                        sent = await self._store.publish_outbox(self._publish, self._batch)
                        self.published += sent
                        if sent < self._batch:
                            await wait_for_notify(self._idle_poll_s)
            except (StoreUnavailable, BrokerUnavailable) as exc:
                log.error("outbox relay: %s; retrying in 1 s", exc)
                await asyncio.sleep(1.0)

    async def _publish(self, rows: Sequence[OutboxRow]) -> None:
        channel = await self._publisher.channel()
        for key in {row.routing_key for row in rows} - self._declared:
            await _declare(channel, key)
            self._declared.add(key)
        await asyncio.gather(
            *(
                self._publisher.publish_raw(
                    row.exchange,
                    row.routing_key,
                    row.payload,
                    message_id=str(row.message_id),
                    kind=row.kind,
                )
                for row in rows
            )
        )
        log.debug("outbox relay: published %d", len(rows))


async def _declare(channel: aio_pika.abc.AbstractChannel, agent_queue: str) -> None:
    # The queue exists before the first LaunchRun for it, so that an agent started later
    # finds its instructions waiting.
    await declare_instructions_queue(channel, agent_queue)
