"""What the ``dispatcher`` subcommands share: connection options, errors, the store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from transport.errors import TransportError

from .errors import DispatcherError
from .store import Store

T = TypeVar("T")
S = TypeVar("S", bound=Store)

#: What a command reports in one line with an exit status: the control plane's errors and
#: the transport's (the broker's).
KNOWN_ERRORS = (DispatcherError, TransportError)

AmqpUrl = Annotated[
    str,
    typer.Option(envvar="HD_AMQP_URL", help="Broker URL, amqp://user:pass@host:5672/ ."),
]
DatabaseUrl = Annotated[
    str,
    typer.Option(envvar="HD_DATABASE_URL", help="PostgreSQL URL, postgresql://user:pass@host/db ."),
]
DatabaseSchema = Annotated[
    str | None,
    typer.Option(envvar="HD_DATABASE_SCHEMA", help="Schema holding the tables (default: public)."),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Print an error the way every subcommand does, and the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def with_store(
    database_url: str,
    database_schema: str | None,
    action: Callable[[S], Awaitable[T]],
    store_class: type[S] = Store,  # type: ignore[assignment]
    upgrade: bool = False,
) -> T:
    """Open the store, run ``action`` on it, close it; errors end the command with a message."""
    if not database_url:
        raise _fail("no database: pass --database-url or set HD_DATABASE_URL")

    async def go() -> T:
        store = await store_class.open(database_url, schema=database_schema, min_size=1, max_size=2)
        try:
            if upgrade:
                await store.upgrade()
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc), 1) from None


def parse_env(pairs: list[str] | None, form: str = "KEY=VALUE") -> dict[str, str]:
    """``--env`` options as a mapping; a pair without ``=`` ends the command."""
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _fail(f"--env takes {form}, got {pair!r}")
        env[key] = value
    return env
