"""The outbox relay: publishes what the store committed, woken by LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aio_pika.abc

from schemas.topology import CONTROL_EXCHANGE, INSTRUCTIONS_EXCHANGE

from . import metrics
from .amqp import Publisher, declare_control_queue, declare_instructions_queue
from .errors import BrokerUnavailable, StoreUnavailable
from .store import OutboxRow, Store

log = logging.getLogger(__name__)


class OutboxRelay:
    """Publishes unsent outbox rows with confirms, then marks them sent.

    It starts with whatever was left unsent (a crash loses nothing), then sleeps until a
    NOTIFY from a committing transaction wakes it; ``idle_poll_s`` is a safety net and the
    pace at which delayed rows (retry backoff) become due.
    """

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        batch: int = 500,
        idle_poll_s: float = 0.5,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._batch = batch
        self._idle_poll_s = idle_poll_s
        self._declared: set[tuple[str, str]] = set()

    async def run(self) -> None:
        """Relay until cancelled."""
        while True:
            try:
                async with self._store.listen_outbox() as wait_for_notify:
                    while True:
                        sent = await self._store.publish_outbox(self._publish, self._batch)
                        if sent < self._batch:
                            await wait_for_notify(self._idle_poll_s)
            except (StoreUnavailable, BrokerUnavailable) as exc:
                log.error("outbox relay: %s; retrying in 1 s", exc)
                await asyncio.sleep(1.0)

    async def _publish(self, rows: Sequence[OutboxRow]) -> None:
        channel = await self._publisher.channel()
        for target in {(row.exchange, row.routing_key) for row in rows} - self._declared:
            await _declare(channel, *target)
            self._declared.add(target)
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
        metrics.LAUNCHES.inc(sum(1 for row in rows if row.kind == "LaunchRun"))
        log.debug("outbox relay: published %d", len(rows))


async def _declare(channel: aio_pika.abc.AbstractChannel, exchange: str, key: str) -> None:
    # The queue exists before the first message for it, so that an agent started later (or
    # coming back) finds its instructions waiting.
    if exchange == INSTRUCTIONS_EXCHANGE:
        await declare_instructions_queue(channel, key)
    elif exchange == CONTROL_EXCHANGE:
        await declare_control_queue(channel, key)
