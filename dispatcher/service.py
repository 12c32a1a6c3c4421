"""``dispatcher serve``: the control plane process.

Components: the intake (SubmitRun → run row + outbox row), the outbox relay (→ LaunchRun on
the instructions exchange) and the status consumer (run events and heartbeats → PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from schemas import (
    CancelRun,
    Event,
    LocationsWanted,
    Request,
    SubmitRun,
    event_decoder,
    request_decoder,
)
from schemas.topology import REQUESTS_QUEUE, STATUS_STORE_QUEUE

from . import amqp
from .amqp import Consumer, Delivery, Publisher
from .locations import LocationStore
from .relay import OutboxRelay
from .settings import ControlPlaneSettings

log = logging.getLogger(__name__)


class CancellationNotSupported(Exception):
    """CancelRun arrives before cancellation is built; dead-lettered with this reason."""


async def serve(settings: ControlPlaneSettings, stop: asyncio.Event) -> None:
    """Run the control plane until ``stop`` is set or a component fails."""
    # Start-up: the store (and its migrations), then the broker and its topology.
    store = await LocationStore.open(settings.database_url, schema=settings.database_schema)
    connection = None
    try:
        applied = await store.upgrade()
        if applied:
            log.info("database migrated to version %d", applied[-1])
        connection = await amqp.connect(settings.amqp_url, "dispatcher-serve")
        async with connection.channel() as channel:
            await amqp.declare_topology(channel)
        publisher = Publisher(connection)

        async def on_requests(deliveries: list[Delivery[Request]]) -> None:
            submissions = [d.message for d in deliveries if isinstance(d.message, SubmitRun)]
            for delivery in deliveries:
                if isinstance(delivery.message, LocationsWanted):
                    await store.locations_wanted(delivery.message.queues)
                elif isinstance(delivery.message, CancelRun):
                    raise CancellationNotSupported("CancelRun is not supported yet")
            created = await store.accept_submissions(submissions)
            log.info("accepted %d submission(s), %d new run(s)", len(submissions), len(created))

        async def on_events(deliveries: list[Delivery[Event]]) -> None:
            await store.apply_events([d.message for d in deliveries])

        consumers: list[Consumer[Request] | Consumer[Event]] = []
        runners: list[asyncio.Task[Any]] = []
        relay: OutboxRelay | None = None
        if "intake" in settings.components:
            consumers.append(
                Consumer(
                    connection,
                    REQUESTS_QUEUE,
                    request_decoder(),
                    on_requests,
                    publisher,
                    prefetch=settings.intake_prefetch,
                )
            )
        if "status" in settings.components:
            consumers.append(
                Consumer(connection, STATUS_STORE_QUEUE, event_decoder(), on_events, publisher)
            )
        if "relay" in settings.components:
            relay = OutboxRelay(store, publisher, batch=settings.relay_batch)
            runners.append(asyncio.create_task(relay.run(), name="relay"))
        for consumer in consumers:
            await consumer.start()
            runners.append(asyncio.create_task(consumer.run(), name=consumer.queue_name))
        log.info("control plane running: %s", ", ".join(settings.components))

        # Run until asked to stop or until a component fails.
        stopper: asyncio.Task[Any] = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait([*runners, stopper], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not stopper and not t.cancelled() and t.exception()]

        # Shutdown: stop consuming, let in-flight batches finish within the grace period,
        # then cancel what is left and close the connections.
        # The relay is cancelled at once: a row it was publishing stays unsent and goes out
        # again on the next start, which consumers absorb (idempotent on the container name).
        for task in runners:
            if task.get_name() == "relay":
                task.cancel()
        for consumer in consumers:
            await consumer.stop()
        _, pending = await asyncio.wait(runners, timeout=settings.shutdown_grace_s)
        for task in [*pending, stopper]:
            task.cancel()
        await asyncio.gather(*pending, stopper, return_exceptions=True)
        for consumer in consumers:
            await consumer.close()
        await publisher.close()
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
    finally:
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(connection.close())
        await store.close()
