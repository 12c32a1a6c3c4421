"""The broker connection, and which of aio-pika's exceptions mean what.

The broker setting may list the nodes of a cluster (``transport.urls``). aio-pika has no
failover of its own: its robust connection reconnects to the one URL it was given. The
``FailoverConnection`` below is that robust connection, moving on to the next node whenever
an attempt fails or the connection is lost; aio-pika's own restore then re-opens the channels
and re-declares their queues, bindings and consumers on whichever node answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import urllib.parse
from collections.abc import Sequence
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions
from yarl import URL

from . import frames
from .errors import BrokerUnavailable
from .urls import broker_urls, where_of, with_heartbeat

log = logging.getLogger(__name__)


class _SaidByTheCaller(logging.Filter):
    """aiormq logs a connect that failed at ERROR, then raises it: every caller here says it
    in its own words (a command's one line, a process's retry warning), so aiormq's line is
    dropped. Its other records go through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


logging.getLogger("aiormq.connection").addFilter(_SaidByTheCaller())
# A delivery whose properties cannot be read is poison, not the end of the connection.
frames.install()

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
#: What a failed connection attempt raises.
_CANNOT_CONNECT = (*TRANSIENT, aiormq.exceptions.AMQPError)


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection to the nodes of one cluster, taken in turn.

    RobustConnection calls ``_on_connection_close`` both when an open connection is lost and
    when an attempt fails, and reads ``url`` afresh at every attempt: moving ``url`` on to the
    next node there is all the failover needs. Publishes whose confirm was lost with the node
    fail, and ``Publisher`` retries them on the next connection.
    """

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        self.urls = tuple(URL(u) for u in urls)
        self._at = 0
        super().__init__(self.urls[0], **kwargs)
        #: The node of the last attempt, which aio-pika's own log lines name (``__str__``):
        #: ``url`` already names the next one when they are written.
        self._tried = self.url

    @property
    def node(self) -> str:
        """``host:port`` of the node connected to (or to be tried next)."""
        return where_of(str(self.url))

    def __str__(self) -> str:
        shown = self._tried.with_password("******") if self._tried.password else self._tried
        return str(shown)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        lost = self.connected.is_set()
        if self._close_called:
            pass
        elif len(self.urls) > 1:
            self._tried = self.url
            self._at = (self._at + 1) % len(self.urls)
            self.url = self.urls[self._at]
            if lost:
                log.warning(
                    "lost the broker at %s (%s); trying %s next",
                    where_of(str(self._tried)),
                    _reason(closing),
                    self.node,
                )
        elif lost:
            log.warning("lost the broker at %s (%s); reconnecting", self.node, _reason(closing))
        await super()._on_connection_close(closing)

    async def _on_connected(self) -> None:
        await super()._on_connected()
        self._tried = self.url
        if self.connection_attempt > 1:
            log.info("reconnected to the broker at %s", self.node)


def _reason(closing: asyncio.Future[Any]) -> str:
    if closing.cancelled():
        return "closed"
    exc = closing.exception()
    return repr(exc) if exc is not None else "closed"


async def connect(url: str, name: str, timeout: float = 30.0) -> Connection:
    """A connection that reconnects by itself and restores its channels and consumers.

    ``url`` is the broker setting: one URL, or a cluster's nodes separated by commas. The
    nodes are tried in the order given and the first that answers is taken; after a loss the
    connection goes round the list from the node after the lost one.
    """
    urls = tuple(with_heartbeat(u) for u in broker_urls(url))
    failures: list[tuple[str, BaseException]] = []
    for first in range(len(urls)):
        connection = FailoverConnection(
            urls[first:] + urls[:first],
            reconnect_interval=1.0,
            client_properties={"connection_name": name},
        )
        try:
            await connection.connect(timeout=timeout)
        except _CANNOT_CONNECT as exc:
            failures.append((urls[first], exc))
            await connection.close()  # ends its reconnection task
            continue
        except BaseException:
            # Cancelled (a timeout, Ctrl-C): its reconnection task must not outlive the
            # caller, where it would hold the event loop's end.
            with contextlib.suppress(Exception):
                await asyncio.shield(connection.close())
            raise
        return connection
    raise _unavailable_all(failures)


def _unavailable_all(failures: list[tuple[str, BaseException]]) -> BrokerUnavailable:
    """The error when no node answers: each node's failure, in words."""
    if len(failures) == 1:
        return _unavailable(*failures[0])
    each = "; ".join(f"{where_of(url)}: {_unavailable(url, exc)}" for url, exc in failures)
    return BrokerUnavailable(f"none of the {len(failures)} broker nodes answers: {each}")


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
    unreadable = _file_error(exc)
    if tls is None and unreadable is not None:
        files = ", ".join(
            f"{key}={query[key][0]}" for key in ("cafile", "certfile", "keyfile") if key in query
        )
        return BrokerUnavailable(
            f"cannot connect to the broker: a TLS file the URL names ({files}) cannot be "
            f"read: {unreadable.strerror or unreadable}"
        )
    if tls is None:
        return BrokerUnavailable(f"cannot connect to the broker: {exc!r}")
    cafile = query.get("cafile", ["(none: the system's CAs)"])[0]
    certfile = query.get("certfile", ["(none)"])[0]
    return BrokerUnavailable(
        f"TLS with the broker failed: {tls} (cafile={cafile}, certfile={certfile})"
    )


def _file_error(exc: BaseException) -> OSError | None:
    """The file error (a TLS file missing, a directory, unreadable) that ``exc`` is or wraps."""
    kinds = (FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError)
    for current in (exc, exc.__cause__, exc.__context__, *getattr(exc, "args", ())):
        if isinstance(current, kinds):
            return current
    return None


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
    """True when the broker answers but refuses these credentials (a revoked identity): no
    node of the setting lets it in, and one at least says ACCESS_REFUSED."""
    try:
        await probe(url)
    except BrokerUnavailable as exc:
        return "ACCESS_REFUSED" in str(exc)
    return False


async def probe(url: str, timeout: float = 10.0) -> dict[str, object]:
    """Open a plain connection and close it; the server's properties (product, version), of
    the first node of the setting that answers."""
    failures: list[tuple[str, BaseException]] = []
    for one in broker_urls(url):
        try:
            connection = await aio_pika.connect(one, timeout=timeout)
        except _CANNOT_CONNECT as exc:
            failures.append((one, exc))
            continue
        async with connection:
            transport = connection.transport
            return dict(transport.connection.server_properties) if transport else {}
    raise _unavailable_all(failures)
