"""The broker connection, and which of aio-pika's exceptions mean what."""

from __future__ import annotations

import asyncio

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from .errors import BrokerUnavailable

#: The broker connection both sides hold (it reconnects by itself).
Connection = aio_pika.abc.AbstractRobustConnection

#: Exceptions that mean "the connection or channel is gone; try again after a reconnect".
TRANSIENT = (
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.ChannelClosed,
    aio_pika.exceptions.ConnectionClosed,
    RuntimeError,  # aio-pika raises it for a publish on a closed channel
)
#: Exceptions that mean "the broker refused this one operation"; the connection is fine.
REFUSED = (
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelPreconditionFailed,
)


async def connect(url: str, name: str, timeout: float = 30.0) -> Connection:
    """A connection that reconnects by itself and restores its channels and consumers."""
    try:
        return await aio_pika.connect_robust(
            url,
            timeout=timeout,
            reconnect_interval=1.0,
            client_properties={"connection_name": name},
        )
    except (*TRANSIENT, aiormq.exceptions.AMQPError) as exc:
        raise BrokerUnavailable(f"cannot connect to the broker: {exc!r}") from exc


async def credentials_refused(url: str) -> bool:
    """True when the broker answers but refuses these credentials (a revoked identity)."""
    try:
        await probe(url)
    except BrokerUnavailable as exc:
        return "ACCESS_REFUSED" in str(exc)
    return False


async def probe(url: str, timeout: float = 10.0) -> dict[str, object]:
    """Open a plain connection and close it; the server's properties (product, version)."""
    try:
        connection = await aio_pika.connect(url, timeout=timeout)
    except (*TRANSIENT, aiormq.exceptions.AMQPError) as exc:
        raise BrokerUnavailable(f"cannot connect to the broker: {exc!r}") from exc
    async with connection:
        transport = connection.transport
        return dict(transport.connection.server_properties) if transport else {}
