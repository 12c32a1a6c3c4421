"""The publisher: publisher confirms, persistent delivery, retries through a reconnect."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq
from pamqp.commands import Basic

from schemas import Message, encode, kind_of
from schemas.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE_HEADER,
    DEAD_LETTER_REASON_HEADER,
)

from . import metrics
from .connection import REFUSED, TRANSIENT
from .delivery import settle
from .errors import BrokerRefused, BrokerUnavailable, TransportError
from .ports import InboundDelivery

log = logging.getLogger(__name__)

#: AMQP's delivery mode of a message written to disk.
PERSISTENT = 2


class Publisher:
    """Publishes with confirms and persistent delivery on a channel of its own."""

    def __init__(
        self, connection: aio_pika.abc.AbstractRobustConnection, retry_deadline_s: float = 30.0
    ) -> None:
        self._connection = connection
        #: Stamped on every message as its AMQP ``user_id``: the broker refuses a message whose
        #: user_id is not the connection's user, so readers learn who really published it.
        url = getattr(connection, "url", None)
        self.user_id: str | None = getattr(url, "user", None) or None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self.retry_deadline_s = retry_deadline_s

    async def channel(self) -> aio_pika.abc.AbstractChannel:
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel(publisher_confirms=True)
            return self._channel

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Message,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish one message and wait for the broker's confirm."""
        await self.publish_raw(
            exchange,
            routing_key,
            encode(message),
            headers=headers,
            message_id=str(message.message_id),
            kind=kind_of(message),
        )

    async def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        kind: str | None = None,
    ) -> None:
        """Publish bytes as they are (dead letters, tests); confirmed and persistent."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_deadline_s
        delay = 0.1
        while True:
            try:
                channel = cast(aiormq.Channel, await (await self.channel()).get_underlay_channel())
                # Straight to the protocol's channel: aio-pika's message and exchange objects
                # cost as much as the publish itself. ``wait=False`` releases the channel for
                # the next publish as soon as this one's frames are queued, not once written;
                # the broker's confirm, awaited here, is what the publish waits for.
                await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=Basic.Properties(
                        content_type="application/json",
                        delivery_mode=PERSISTENT,
                        message_id=message_id,
                        message_type=kind,
                        headers=headers or {},
                        user_id=self.user_id,
                    ),
                    wait=False,
                )
                return
            except aio_pika.exceptions.DeliveryError as exc:
                raise BrokerRefused(f"the broker refused a publish to {exchange}: {exc}") from exc
            except REFUSED as exc:
                self._channel = None  # the broker closed the channel
                raise BrokerRefused(f"the broker refused a publish to {exchange}: {exc}") from exc
            except TRANSIENT as exc:
                if loop.time() + delay > deadline:
                    waited = self.retry_deadline_s
                    raise BrokerUnavailable(
                        f"publish to {exchange} not confirmed within {waited} s: {exc!r}"
                    ) from exc
                log.warning("publish to %s failed (%r); retrying in %.1f s", exchange, exc, delay)
                self._channel = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def dead_letter(self, message: InboundDelivery, queue: str, reason: str) -> None:
        """Send a poison message to the dead-letter queue with its reason; confirmed.

        Only our two headers travel with it: the sender's own headers could be anything (an
        attacker's ``x-hd-reason``, a table too large for a frame), and a dead letter must
        always be publishable.
        """
        metrics.DEAD_LETTERED.labels(queue).inc()
        headers: dict[str, Any] = {
            DEAD_LETTER_REASON_HEADER: reason[:1000],
            DEAD_LETTER_QUEUE_HEADER: queue,
        }
        await self.publish_raw(
            DEAD_LETTER_EXCHANGE,
            queue,
            message.body,
            headers=headers,
            message_id=message.message_id,
        )

    async def reject(self, message: InboundDelivery, queue: str, reason: str) -> None:
        """Dead-letter a poison message with its reason, then ack it.

        It is acked even when the dead letter cannot be sent (the broker refuses it, or is
        gone past the retry deadline): kept, a poison message would come back for ever. The
        failure is logged, with the reason the message was refused for.
        """
        try:
            await self.dead_letter(message, queue, reason)
        except Exception as exc:
            log.error(
                "could not dead-letter a message from %s (%s); dropping it: %s",
                queue,
                reason[:300],
                exc,
                exc_info=not isinstance(exc, TransportError),
            )
        await settle(message.ack())

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        self._channel = None
