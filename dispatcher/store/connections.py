"""PostgreSQL connections through asyncpg: the pool, transactions, LISTEN, and error translation.

asyncpg's connection errors become ``StoreUnavailable`` here and nowhere else; every module
of the store takes its connections from ``Connections``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Self

import asyncpg

from transport.urls import PERCENT_HINT, hide_password, in_words, stray_at, text_of_a_url

from ..errors import ConfigError, DispatcherError, StoreUnavailable

#: asyncpg's exceptions that mean "the database is out for now" (translated into
#: StoreUnavailable, and only these).
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    # Shutdown, crash and recovery of the server (SQL state class 57).
    asyncpg.exceptions.OperatorInterventionError,
    # A pooled connection the server dropped mid-operation can be left in a state where its
    # next use fails this way (seen when PostgreSQL restarts under load).
    asyncpg.exceptions.InternalClientError,
)

Connection = asyncpg.Connection


def check_url(dsn: str) -> None:
    """Refuse, before asyncpg reads it, a database URL whose password has an unencoded
    ``/ ? # @`` in it: asyncpg cuts at the first ``@``, and takes what follows for hosts,
    which its errors name (a connection attempt to a piece of the password, even)."""
    if not text_of_a_url(dsn):
        raise ConfigError(
            "the database URL has a control character or a byte that is no UTF-8 in it "
            "(percent-encode it)"
        )
    if stray_at(dsn):
        raise ConfigError(
            f"the database URL ({hide_password(dsn)}) has an @ out of place: {PERCENT_HINT}"
        )


def refused_at_connect(exc: Exception, dsn: str) -> ConfigError:
    """What PostgreSQL refused at connect (``?foo=bar``: a setting it does not know)."""
    return ConfigError(
        f"PostgreSQL refused the connection ({hide_password(dsn)}): {in_words(exc, dsn)}"
    )


def invalid_url(exc: Exception, dsn: str) -> ConfigError:
    """What is wrong with the database URL, in the parser's words but for the password
    (which it may quote, in part, when an unencoded ``/`` or ``#`` cut it)."""
    why = in_words(exc, dsn)
    return ConfigError(f"the database URL ({hide_password(dsn)}) is invalid: {why}")


def check_schema(schema: str | None) -> None:
    """Refuse a schema name PostgreSQL would take for another: a comma in ``search_path``
    made it a list (``a,public`` put every table in ``public``), and a quote, a control
    character or a space at either end is a typo more than a name. Any other name is used
    as written, quoted (an uppercase letter or a ``-`` included)."""
    if not schema:
        return
    if (
        any(c in schema for c in ',"') or not schema.isprintable() or schema != schema.strip()
    ) or schema.startswith("pg_"):
        raise ConfigError(
            f"the database schema {schema!r} cannot be used: a name without commas, quotes, "
            "control characters or spaces at either end, not starting with pg_"
        )


def quoted(schema: str) -> str:
    """``schema`` as an SQL identifier, as written (``check_schema`` has taken it)."""
    return f'"{schema}"'


def _server_settings(schema: str | None) -> dict[str, str]:
    check_schema(schema)
    return {"search_path": quoted(schema)} if schema else {}


async def connect(dsn: str, schema: str | None = None) -> asyncpg.Connection:
    """A connection of its own (outside the pool), for LISTEN and session locks."""
    check_url(dsn)
    try:
        return await asyncpg.connect(dsn, server_settings=_server_settings(schema), timeout=30)
    except asyncpg.exceptions.ClientConfigurationError as exc:  # an InterfaceError too
        raise invalid_url(exc, dsn) from None
    except (*UNAVAILABLE, *REFUSED) as exc:
        raise cannot_connect(exc) from exc
    except (ValueError, OverflowError, IndexError) as exc:  # a port that is no number, past
        raise invalid_url(exc, dsn) from None  # 65535, a host list with an empty entry
    except asyncpg.PostgresError as exc:  # a setting of the URL the server refuses
        raise refused_at_connect(exc, dsn) from None


#: The server refused the client: a password, or a certificate it asks for (over SSL).
REFUSED = (
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.InvalidCatalogNameError,  # no such database
)


def cannot_connect(exc: BaseException) -> DispatcherError:
    """The error for a failed connect; a TLS failure or a refusal is said in words."""
    if isinstance(exc, ssl.SSLCertVerificationError) and "mismatch" in str(exc.verify_message):
        return StoreUnavailable(
            "TLS with PostgreSQL failed: the server's certificate is not valid for this host "
            f"name ({exc.verify_message}): connect by a name the certificate lists"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return StoreUnavailable(
            "TLS with PostgreSQL failed: the server's certificate is not trusted "
            f"({exc.verify_message}): give the CA that signed it (sslrootcert= in the URL)"
        )
    if isinstance(exc, ssl.SSLError):
        return StoreUnavailable(f"TLS with PostgreSQL failed: {exc.reason or exc}")
    if isinstance(exc, REFUSED):
        return ConfigError(f"PostgreSQL refused the connection: {exc}")
    if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError):
        # TLS files (sslrootcert=, sslcert=, sslkey=) are read without naming the file.
        return ConfigError(
            f"cannot connect to PostgreSQL: a file or directory the database URL names "
            f"(sslrootcert=, sslcert=, sslkey=, or a socket's host=) cannot be read: "
            f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"
        )
    return StoreUnavailable(f"cannot connect to PostgreSQL: {exc!r}")


def refused_in_words(exc: Exception, schema: str | None) -> str | None:
    """What PostgreSQL refused, in one line; None for an error that is not PostgreSQL's."""
    if isinstance(exc, asyncpg.exceptions.UndefinedTableError):
        where = f"schema {schema!r}" if schema else "this database"
        return (
            f"{where} has no dispatcher tables ({exc}): run `dispatcher db upgrade` first, "
            "with the same database and schema"
        )
    if isinstance(exc, asyncpg.PostgresError):
        return f"PostgreSQL refused the command: {exc}"
    return None


async def close_quietly(connection: asyncpg.Connection) -> None:
    """Close a connection of its own; one the server dropped is torn down instead."""
    if connection.is_closed():
        return
    try:
        await connection.close(timeout=5)
    except (*UNAVAILABLE, asyncpg.PostgresError):
        connection.terminate()


async def _left_as_it_is(connection: asyncpg.Connection) -> None:
    """What a pooled connection is reset with when it goes back to the pool: nothing.

    asyncpg's default sends a query (advisory locks, cursors, LISTEN, settings) after every
    use: one more round trip on every transaction's way out, the launch path's included. No
    code here leaves any of that on a pooled connection: LISTEN and session locks (the
    leader's, the migrator's) have connections of their own, and no code sets a session
    setting or opens a cursor outside a transaction. asyncpg still rolls back a transaction
    left open."""


class Connections:
    """A pool of connections to one database (and one schema, if given)."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, schema: str | None) -> None:
        self._pool = pool
        self.dsn = dsn
        self.schema = schema

    @classmethod
    async def open(
        cls, dsn: str, schema: str | None = None, min_size: int = 2, max_size: int = 10
    ) -> Self:
        check_url(dsn)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                server_settings=_server_settings(schema),
                timeout=30,
                reset=_left_as_it_is,
            )
        except asyncpg.exceptions.ClientConfigurationError as exc:  # an InterfaceError too
            raise invalid_url(exc, dsn) from None
        except (*UNAVAILABLE, *REFUSED) as exc:
            raise cannot_connect(exc) from exc
        except (ValueError, OverflowError, IndexError) as exc:
            # What asyncpg's URL parser raises (a port that is no number, a host list with an
            # empty entry), and the socket's connect (a port past 65535).
            raise invalid_url(exc, dsn) from None
        except asyncpg.PostgresError as exc:  # a setting of the URL the server refuses
            raise refused_at_connect(exc, dsn) from None
        assert pool is not None
        return cls(pool, dsn, schema)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _acquire(self, transaction: bool) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool.acquire() as connection:
                if transaction:
                    async with connection.transaction():
                        yield connection
                else:
                    yield connection
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc
        except asyncpg.exceptions.TransactionRollbackError as exc:
            # A deadlock or a serialization failure (SQL state class 40): PostgreSQL rolled
            # the transaction back and says to try it again, which the caller does (a consumer
            # holds its batch; a relay's round comes again).
            raise StoreUnavailable(f"PostgreSQL rolled a transaction back: {exc!r}") from exc

    def connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A pooled connection, in autocommit."""
        return self._acquire(transaction=False)

    def transaction(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A pooled connection inside a transaction: committed on exit, rolled back on error."""
        return self._acquire(transaction=True)

    @asynccontextmanager
    async def listen(self, channel: str) -> AsyncIterator[Callable[[float], Awaitable[None]]]:
        """A dedicated LISTEN connection; yields a function that waits for the next NOTIFY.

        The function returns on a notification or after its timeout, and raises
        ``StoreUnavailable`` once the connection is gone.
        """
        connection = await connect(self.dsn, self.schema)
        wake = asyncio.Event()

        def on_notify(*_: object) -> None:
            wake.set()

        async def wait(timeout: float = 5.0) -> None:
            try:
                await asyncio.wait_for(wake.wait(), timeout)
            except TimeoutError:
                if connection.is_closed():
                    raise StoreUnavailable("the LISTEN connection closed") from None
            wake.clear()

        try:
            try:
                await connection.add_listener(channel, on_notify)
            except UNAVAILABLE as exc:
                raise StoreUnavailable(f"cannot LISTEN: {exc!r}") from exc
            yield wait
        finally:
            await close_quietly(connection)
