"""``dispatcher identities add|rotate|revoke``: the broker identities (roles) of the control
plane, the failure monitor and the web process."""

from __future__ import annotations

import asyncio
import enum
from typing import Annotated

import typer

from .cli_common import AmqpUrl, DatabaseSchema, DatabaseUrl
from .cli_identities import ManagementUrl, _audit, on_broker

identities_app = typer.Typer(
    help="Broker identities of the control plane, the failure monitor and the web process: "
    "least privilege, no administrator (agents: `agents add`; submitters: `tokens add`).",
    no_args_is_help=True,
)


class RoleName(enum.StrEnum):
    CONTROL_PLANE = "control-plane"
    MONITOR = "monitor"
    WEB = "web"


Name = Annotated[str, typer.Argument(help="Its broker user name.")]

_USE = {
    RoleName.CONTROL_PLANE: "run `dispatcher serve` with it (HD_AMQP_URL); name the operators' "
    "users in HD_TRUSTED_BROKER_USERS so that their submissions are taken",
    RoleName.MONITOR: "run `dispatcher monitor` with it (HD_AMQP_URL)",
    RoleName.WEB: "run `dispatcher web` with it (HD_AMQP_URL) and name it in the control "
    "plane's HD_TRUSTED_BROKER_USERS so that its submissions are taken",
}


@identities_app.command("add")
def identities_add(
    role: Annotated[RoleName, typer.Argument(help="Which process it is for.")],
    name: Name,
    amqp_url: AmqpUrl = "",
    management_url: ManagementUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Create (or reset) the broker identity of a control plane, a monitor or a web process,
    with the permissions of what that process does and nothing more. Prints its URL once."""
    from .roles import add_role, role_named

    url = on_broker(
        amqp_url,
        lambda: asyncio.run(add_role(amqp_url, management_url, role_named(role.value), name)),
    )
    _audit(database_url, database_schema, "identity.add", name, {"role": role.value})
    typer.echo(url)
    typer.echo(f"{role.value} identity {name}: the secret is shown once; {_USE[role]}", err=True)


@identities_app.command("rotate")
def identities_rotate(
    name: Name,
    amqp_url: AmqpUrl = "",
    management_url: ManagementUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Give a control plane's, a monitor's or a web process's identity a new secret (its
    permissions stay) and close its connections; prints its new URL once."""
    from .roles import rotate_role

    role, url, closed = on_broker(amqp_url, lambda: rotate_role(amqp_url, management_url, name))
    details = {"role": role.name, "connections_closed": closed}
    _audit(database_url, database_schema, "identity.rotate", name, details)
    typer.echo(url)
    typer.echo(f"{role.name} identity {name}: new secret; {closed} connection(s) closed", err=True)


@identities_app.command("revoke")
def identities_revoke(
    name: Name,
    amqp_url: AmqpUrl = "",
    management_url: ManagementUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Delete a control plane's, a monitor's or a web process's identity; its connections
    are closed."""
    from .roles import revoke_role

    role = on_broker(amqp_url, lambda: revoke_role(amqp_url, management_url, name))
    _audit(database_url, database_schema, "identity.revoke", name, {"role": role.name})
    typer.echo(f"{role.name} identity {name} revoked: its connections are cut")
