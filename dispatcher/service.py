"""``dispatcher serve``: the control plane process.

Components: the intake (SubmitRun → run row + outbox row; CancelRun; RunStateWanted), the
outbox relay (→ LaunchRun on the instructions exchange, with the admitter that releases runs
held by concurrency limits) and the status consumer (run events and heartbeats → PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

import msgspec

from schemas import (
    CancelRun,
    Event,
    LocationsWanted,
    Request,
    RunStateWanted,
    SubmitRun,
    event_decoder,
    request_decoder,
)
from schemas.topology import (
    DEAD_LETTER_WATCH_QUEUE,
    REQUESTS_QUEUE,
    STATUS_STORE_QUEUE,
)
from transport import policies
from transport.connection import REFUSED, Connection, connect
from transport.consumer import Consumer
from transport.delivery import Delivery
from transport.errors import BrokerRefused, BrokerUnavailable
from transport.process import bounded, unless_stopped
from transport.publisher import Publisher
from transport.topology import declare_topology

from . import dead_letters, metrics, provenance
from .admitter import Admitter
from .errors import StoreUnavailable
from .relay import OutboxRelay
from .settings import ControlPlaneSettings, trusted_broker_users
from .store import Database, OutboxItem, answers
from .submissions import in_a_reason

log = logging.getLogger(__name__)


async def serve(settings: ControlPlaneSettings, stop: asyncio.Event) -> None:
    """Run the control plane until ``stop`` is set or a component fails."""
    # Start-up: the store (and its migrations), then the broker and its topology.
    # Each step of the start-up gives way to a stop (a SIGTERM while a broker or a database
    # does not answer is an orderly end, not one 30 s later with exit 1).
    store = await unless_stopped(
        stop, Database.open(settings.database_url, schema=settings.database_schema)
    )
    connection = watch_connection = None
    try:
        applied = await unless_stopped(stop, store.upgrade())
        if applied:
            log.info("database migrated to version %d", applied[-1])
        connection = await unless_stopped(stop, connect(settings.amqp_url, "dispatcher-serve"))
        await unless_stopped(stop, _declare(connection))
        if settings.broker_policies:
            await unless_stopped(stop, _apply_policies(settings))
        publisher = Publisher(connection)

        relay = (
            OutboxRelay(store, publisher, batch=settings.relay_batch)
            if "relay" in settings.components
            else None
        )

        async def refuse(body: bytes, message: Request | None, reason: str) -> None:
            # A refused submission is answered, so that its waiter reports the reason; never
            # for a run that exists (a forged submission must not fail someone else's wait).
            # Through the outbox, as the intake's refusals: kept, it is said again to a
            # waiter that asks after losing its connection.
            run_id = message.run_id if isinstance(message, SubmitRun) else _submitted_run(body)
            if run_id is not None:
                await store.runs.refuse_unknown(run_id, in_a_reason(reason))

        async def on_dead_letters(deliveries: list[Delivery[bytes]]) -> None:
            letters = [
                dead_letters.seen(d.raw.headers, d.message, d.raw.message_id) for d in deliveries
            ]
            letters = await store.dead_letters.record(letters)
            for letter in letters:
                metrics.DEAD_LETTERS_SEEN.labels(letter.source_queue).inc()

        trusted = trusted_broker_users(settings.amqp_url)

        async def on_requests(deliveries: list[Delivery[Request]]) -> None:
            submitted = [d for d in deliveries if isinstance(d.message, SubmitRun)]
            cancels = [d for d in deliveries if isinstance(d.message, CancelRun)]
            asks = [d for d in deliveries if isinstance(d.message, RunStateWanted)]
            for delivery in deliveries:
                if isinstance(delivery.message, LocationsWanted):
                    await store.locations.wanted(delivery.message.queues)
            # Who sent each submission (the broker verified the user_id) decides whether it
            # may be made at all, and where: see dispatcher.submitters.
            submissions = [d.message for d in submitted if isinstance(d.message, SubmitRun)]
            senders = [d.raw.user_id for d in submitted]
            # With a relay in this process (and few hand-offs in flight), the new runs'
            # LaunchRun go to it as soon as they are committed: no NOTIFY to wait for, no claim
            # of the rows. Handed over even if what follows the commit fails.
            handed: list[OutboxItem] | None = (
                [] if relay is not None and relay.takes_hand_offs() else None
            )
            try:
                created = await store.accept_submissions(submissions, senders, trusted, handed)
            finally:
                if relay is not None and handed:
                    relay.hand_off(handed)
            if handed:
                # The hand-off's publish goes out first, before this batch's log line and ack.
                await asyncio.sleep(0)
            log.info("accepted %d submission(s), %d new run(s)", len(submissions), len(created))
            # After the submissions: a run submitted and canceled in one batch exists by now.
            if cancels:
                requests = [d.message for d in cancels if isinstance(d.message, CancelRun)]
                outcomes = await store.cancel(requests, [d.raw.user_id for d in cancels], trusted)
                for request, outcome in zip(requests, outcomes, strict=True):
                    if isinstance(outcome, str):  # refused: who sent it may not
                        log.warning("cancel of run %s refused: %s", request.run_id, outcome)
                    else:
                        log.info("cancel of run %s: %s", request.run_id, outcome.outcome.value)
            if asks:
                wanted = [d.message for d in asks if isinstance(d.message, RunStateWanted)]
                said = await store.say_again(wanted, [d.raw.user_id for d in asks], trusted)
                for asked, what in zip(wanted, said, strict=True):
                    if isinstance(what, answers.Said):
                        log.info("run %s's state asked for: %s", asked.run_id, what.value)
                    else:
                        log.warning("ask about run %s refused: %s", asked.run_id, what)

        async def on_events(deliveries: list[Delivery[Event]]) -> None:
            answers: list[OutboxItem] = []
            await store.apply_events([d.message for d in deliveries], answers)
            if answers:
                # Committed: claimants wait on these to start their containers.
                await asyncio.gather(*(answer_claim(item) for item in answers))

        async def answer_claim(item: OutboxItem) -> None:
            try:
                await publisher.publish(item.exchange, item.routing_key, item.message)
            except (BrokerUnavailable, BrokerRefused) as exc:
                # The claimant claims again when no answer comes, and is answered the same.
                run_id = getattr(item.message, "run_id", None)
                log.warning("answer to a claim of run %s not sent: %s", run_id, exc)

        consumers: list[Consumer[Request] | Consumer[Event] | Consumer[bytes]] = []
        runners: list[asyncio.Task[Any]] = []
        if "intake" in settings.components:
            consumers.append(
                Consumer(
                    connection,
                    REQUESTS_QUEUE,
                    request_decoder(),
                    on_requests,
                    publisher,
                    prefetch=settings.intake_prefetch,
                    on_poison=refuse,
                )
            )
        if "status" in settings.components:
            consumers.append(
                Consumer(
                    connection,
                    STATUS_STORE_QUEUE,
                    event_decoder(),
                    on_events,
                    publisher,
                    verify=provenance.check,
                    check_sender=provenance.sender_check(trusted),
                )
            )
            # Dead letters on a connection of their own, so that whatever one holds, the other
            # consumers go on (one whose properties cannot be read arrives marked, and is
            # recorded with that reason: transport.frames).
            watch_connection = await connect(settings.amqp_url, "dispatcher-dead-letters")
            consumers.append(
                Consumer(
                    watch_connection,
                    DEAD_LETTER_WATCH_QUEUE,
                    dead_letters.RawDecoder(),
                    on_dead_letters,
                    publisher,
                    dead_letters=False,
                )
            )
        if relay is not None:
            runners.append(asyncio.create_task(relay.run(), name="relay"))
            runners.append(asyncio.create_task(Admitter(store).run(), name="admitter"))
        if "web" in settings.components:
            from .settings import WebSettings

            serve_web = web_server()
            web = WebSettings.from_env(
                amqp_url=settings.amqp_url,
                database_url=settings.database_url,
                database_schema=settings.database_schema,
            )
            runners.append(asyncio.create_task(serve_web(web, stop), name="web"))
        if settings.retention_days is not None:
            runners.append(
                asyncio.create_task(
                    _prune_periodically(store, settings.retention_days, settings.retention_every_s),
                    name="retention",
                )
            )
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
        # The relay's round is cancelled at once: a row it was publishing stays unsent and
        # goes out again on the next start, which consumers absorb (idempotent on the
        # container name). Rows the intake hands it meanwhile are published (``drain``).
        for task in runners:
            if task.get_name() in ("relay", "admitter", "retention"):
                task.cancel()
        # Each step bounded: with the broker away, a robust channel's cancel or close waits
        # for a reconnection that may never come.
        grace = settings.shutdown_grace_s
        for consumer in consumers:
            await bounded(consumer.stop(), grace, f"stopping the consumer of {consumer.queue_name}")
        _, pending = await asyncio.wait(runners, timeout=settings.shutdown_grace_s)
        if relay is not None:
            await relay.drain(settings.shutdown_grace_s)
        for task in [*pending, stopper]:
            task.cancel()
        await asyncio.gather(*pending, stopper, return_exceptions=True)
        for consumer in consumers:
            await bounded(consumer.close(), grace, f"closing the consumer of {consumer.queue_name}")
        await bounded(publisher.close(), grace, "closing the publisher")
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
    finally:
        for opened in (connection, watch_connection):
            if opened is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(opened.close())
        await store.close()


async def _declare(connection: Connection) -> None:
    """The control plane's exchanges and queues; a broker user that may not declare them is
    told so in one line (it was a traceback)."""
    try:
        async with connection.channel() as channel:
            await declare_topology(channel)
    except REFUSED as exc:
        raise BrokerRefused(
            f"the broker refused the control plane's exchanges and queues ({exc}): give its "
            "user configure, write and read permissions on the vhost"
        ) from None


class _Submitted(msgspec.Struct):
    """The two fields needed to answer a submission that cannot be decoded."""

    kind: str = ""
    run_id: uuid.UUID | None = None


def _submitted_run(body: bytes) -> uuid.UUID | None:
    """The run id of an undecodable SubmitRun, when its payload still names one."""
    try:
        probe = msgspec.json.decode(body[: 2 * 1024 * 1024], type=_Submitted)
    except Exception:  # anything hostile: nobody to answer
        return None
    return probe.run_id if probe.kind == "SubmitRun" else None


async def _prune_periodically(store: Database, days: float, every_s: float) -> None:
    """Retention on a schedule: a database out for a while skips a round, nothing more."""
    while True:
        try:
            pruned = await store.retention.prune(days * 86400)
            if pruned.total:
                log.info("retention: pruned %s", pruned.counts)
        except StoreUnavailable as exc:
            log.warning("retention skipped: %s", exc)
        await asyncio.sleep(every_s)


async def _apply_policies(settings: ControlPlaneSettings) -> None:
    """Set the broker policies; an explicitly given management API must answer."""
    limits = policies.PolicyLimits(settings.delivery_limit, settings.dead_letter_max_length)
    try:
        api = policies.management_api(settings.amqp_url, settings.management_url)
        await asyncio.to_thread(policies.apply_policies, api, limits)
    except BrokerUnavailable as exc:
        if settings.management_url:
            raise
        log.warning(
            "broker policies not set (%s): no delivery limit backstop; set "
            "HD_AMQP_MANAGEMENT_URL, or HD_BROKER_POLICIES=off to silence this",
            exc,
        )
        return
    log.info(
        "broker policies set on vhost %s (delivery limit %d)", api.vhost, limits.delivery_limit
    )


def web_server() -> Any:
    """``serve_web``; without the web extra installed, a ConfigError that says what to install."""
    try:
        from .web.server import serve_web
    except ModuleNotFoundError as exc:
        from .errors import ConfigError

        raise ConfigError(
            f"the HTTP API needs {exc.name!r}: pip install 'hybrid-dispatcher[web]'"
        ) from None
    return serve_web
