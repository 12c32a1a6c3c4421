"""What the ``dispatcher`` subcommands share: connection options, errors, the store."""

from __future__ import annotations

from typing import Annotated

import typer

from .store import Store

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


async def _open_store(database_url: str, database_schema: str | None) -> Store:
    if not database_url:
        raise _fail("no database: pass --database-url or set HD_DATABASE_URL")
    return await Store.open(database_url, schema=database_schema, min_size=1, max_size=2)
