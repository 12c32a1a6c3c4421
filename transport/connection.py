"""The broker connection, and which of aio-pika's exceptions mean what."""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse

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
        raise _unavailable(url, exc) from exc


def _unavailable(url: str, exc: BaseException) -> BrokerUnavailable:
    """The error for a failed connect; a TLS failure is said in words, with the option to fix."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    tls = tls_failure(exc)
    if tls is None and parts.scheme == "amqps" and "certfile" not in query and _reset(exc):
        # Over TLS 1.3 a server that wants a client certificate may just drop the connection
        # once the handshake is over, instead of sending its alert.
        tls = (
            "the broker dropped the connection at the handshake: it may require a client "
            "certificate (give certfile= and keyfile=, signed by a CA the broker trusts)"
        )
    if tls is None:
        return BrokerUnavailable(f"cannot connect to the broker: {exc!r}")
    cafile = query.get("cafile", ["(none: the system's CAs)"])[0]
    certfile = query.get("certfile", ["(none)"])[0]
    return BrokerUnavailable(
        f"TLS with the broker failed: {tls} (cafile={cafile}, certfile={certfile})"
    )


def _reset(exc: BaseException) -> bool:
    return "connection reset" in repr(exc).lower() or isinstance(exc, ConnectionResetError)


def tls_failure(exc: BaseException) -> str | None:
    """What went wrong in a TLS handshake, in words; None when ``exc`` is no TLS failure.

    Looks through causes and arguments: the client library may wrap the ssl module's error."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return _describe(current)
        pending.extend(a for a in getattr(current, "args", ()) if isinstance(a, BaseException))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


def _describe(error: ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        if "mismatch" in str(error.verify_message):
            return (
                f"the server's certificate is not valid for this host name "
                f"({error.verify_message}): connect by a name the certificate lists"
            )
        return (
            f"the server's certificate is not trusted ({error.verify_message}): "
            "give the CA that signed it (cafile=)"
        )
    reason = error.reason or str(error)
    if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
        return (
            f"the server requires a client certificate ({reason}): give one "
            "(certfile= and keyfile=) signed by a CA the server trusts"
        )
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
        return f"the server refused the client certificate ({reason})"
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        return f"the server does not speak TLS on this port ({reason})"
    return f"TLS error: {reason}"


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
        raise _unavailable(url, exc) from exc
    async with connection:
        transport = connection.transport
        return dict(transport.connection.server_properties) if transport else {}
