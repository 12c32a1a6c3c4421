"""``dispatcher agents add|rotate|revoke``: agent identities on the broker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from .cli_common import (
    KNOWN_ERRORS,
    AmqpUrl,
    DatabaseSchema,
    DatabaseUrl,
    _fail,
    operator,
    with_store,
)
from .cli_ops import agents_app

T = TypeVar("T")

ManagementUrl = Annotated[
    str,
    typer.Option(
        envvar="HD_AMQP_MANAGEMENT_URL",
        help="RabbitMQ management API, http://user:pass@host:15672 (default: the broker's host "
        "on 15672, or https on 15671 for amqps, with the AMQP credentials, which must be an "
        "administrator's).",
    ),
]
Name = Annotated[str, typer.Argument(help="The agent's id (also its broker user name).")]


def _audit(
    database_url: str, schema: str | None, action: str, name: str, details: dict[str, object]
) -> None:
    """Record the action in the audit log when the control plane's database is given."""
    if database_url:
        with_store(
            database_url,
            schema,
            lambda s: s.audit.record(operator(), action, name, details),
            upgrade=True,
        )


def _need_broker(amqp_url: str) -> None:
    if not amqp_url:
        raise _fail("no broker: pass --amqp-url or set HD_AMQP_URL (an administrator's)")


def on_broker(amqp_url: str, call: Callable[[], T]) -> T:
    """An identity command's broker call: a missing broker, or an error the call reports,
    ends the command with its message."""
    _need_broker(amqp_url)
    try:
        return call()
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc), 1) from None


@agents_app.command("add")
def agents_add(
    name: Name,
    queue: Annotated[
        list[str] | None,
        typer.Option("--queue", "-q", help="Agent queue it may consume; repeatable (default)."),
    ] = None,
    amqp_url: AmqpUrl = "",
    management_url: ManagementUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Create an agent's broker identity: its own user, a generated secret, and permissions
    for its queues and its own status keys only. Prints the agent's URL once: give it to
    `worker-agent run --amqp-url` (or HD_AMQP_URL) on the agent's host."""
    from .identities import add_agent

    url = on_broker(
        amqp_url,
        lambda: asyncio.run(add_agent(amqp_url, management_url, name, queue or ["default"])),
    )
    _audit(database_url, database_schema, "agent.add", name, {"queues": queue or ["default"]})
    typer.echo(url)
    typer.echo(f"agent {name}: the secret is shown once; rotate it with `agents rotate`", err=True)


@agents_app.command("rotate")
def agents_rotate(
    name: Name,
    amqp_url: AmqpUrl = "",
    management_url: ManagementUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Give an agent a new secret (its permissions stay) and close its open connections;
    prints its new URL once."""
    from .identities import rotate_agent

    url, closed = on_broker(amqp_url, lambda: rotate_agent(amqp_url, management_url, name))
    _audit(database_url, database_schema, "agent.rotate", name, {"connections_closed": closed})
    typer.echo(url)
    typer.echo(f"agent {name}: new secret; {closed} connection(s) closed", err=True)


@agents_app.command("revoke")
def agents_revoke(
    name: Name,
    amqp_url: AmqpUrl = "",
    management_url: ManagementUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Delete an agent's broker identity and close its connections: it can no longer take
    instructions or report; the failure monitor declares it lost and fails its runs over."""
    from .identities import revoke_agent

    on_broker(amqp_url, lambda: revoke_agent(amqp_url, management_url, name))
    _audit(database_url, database_schema, "agent.revoke", name, {})
    typer.echo(f"agent {name} revoked: its connections are cut and its secret refused")
