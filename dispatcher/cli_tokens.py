"""``dispatcher tokens add|list|revoke``: submitter tokens, on the broker and in PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

from .cli_common import (
    KNOWN_ERRORS,
    AmqpUrl,
    DatabaseSchema,
    DatabaseUrl,
    LimitLocations,
    LimitQueues,
    _fail,
    limits_of,
    operator,
    with_store,
)
from .cli_identities import ManagementUrl, _need_broker

tokens_app = typer.Typer(
    help="Submitter tokens: broker users that may only submit runs, within limits kept in "
    "PostgreSQL, and follow runs by id (their own, whose ids they know; the broker cannot "
    "tell a token's runs from others').",
    no_args_is_help=True,
)

Name = Annotated[str, typer.Argument(help="The token's name (also its broker user name).")]


def _need_database(database_url: str) -> None:
    if not database_url:
        raise _fail(
            "a token's limits live in the control plane's database: pass --database-url or "
            "set HD_DATABASE_URL"
        )


@tokens_app.command("add")
def tokens_add(
    name: Name,
    queue: LimitQueues = None,
    location: LimitLocations = None,
    amqp_url: AmqpUrl = "",
    management_url: ManagementUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Create a submitter token (or reset its secret and limits): a broker user that may only
    publish requests and follow runs by id (its own, whose ids it knows). Prints its URL
    once: give it to the submitter's `dispatcher submit --amqp-url` (or HD_AMQP_URL, or
    `Client(url)`)."""
    from schemas import is_safe_name

    from .submissions import is_location_name
    from .tokens import add_submitter, revoke_submitter

    _need_broker(amqp_url)
    _need_database(database_url)
    for name_ in queue or ():
        if not is_safe_name(name_):
            raise _fail(f"queue name {name_!r} is invalid: letters, digits, '_' and '-'")
    for name_ in location or ():
        # A name no location can have would make a token that silently submits nothing.
        if not is_location_name(name_):
            raise _fail(
                f"location name {name_!r} is invalid: 1 to 63 lowercase letters, digits, '_' "
                "and '-'"
            )
    limits = limits_of(queue, location)
    try:
        url = asyncio.run(add_submitter(amqp_url, management_url, name))
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc), 1) from None
    try:
        actor = operator()
        with_store(
            database_url,
            database_schema,
            lambda s: s.submitters.register(actor, name, limits),
            upgrade=True,
        )
    except typer.Exit:
        # Unregistered, the token would be refused anyway; take it off the broker too.
        try:
            revoke_submitter(amqp_url, management_url, name)
        except KNOWN_ERRORS as exc:
            typer.echo(f"error: the token's broker user is left in place: {exc}", err=True)
        raise
    typer.echo(url)
    typer.echo(
        f"submitter token {name} ({limits.describe()}): the secret is shown once; "
        "revoke it with `tokens revoke`",
        err=True,
    )


@tokens_app.command("list")
def tokens_list(
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help='One JSON object: {"tokens": [...], "unregistered_users": [...]}.'
        ),
    ] = False,
    amqp_url: AmqpUrl = "",
    management_url: ManagementUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Registered tokens and their limits; with the broker given, also whether each has its
    broker user (and the broker's submitter users that are not registered)."""
    from .tokens import submitter_users

    _need_database(database_url)
    rows = with_store(database_url, database_schema, lambda s: s.submitters.all(), upgrade=True)
    users: set[str] | None = None
    if amqp_url:
        try:
            users = set(submitter_users(amqp_url, management_url))
        except KNOWN_ERRORS as exc:
            raise _fail(str(exc), 1) from None
    strays = sorted((users or set()) - {row.name for row in rows})
    if as_json:
        listed = [
            {
                "name": row.name,
                "queues": list(row.limits.queues),
                "locations": list(row.limits.locations),
                "created_at": row.created_at.isoformat(timespec="seconds"),
                "created_by": row.created_by,
                "broker_user": None if users is None else row.name in users,
            }
            for row in rows
        ]
        typer.echo(json.dumps({"tokens": listed, "unregistered_users": strays}, indent=2))
        return
    for row in rows:
        missing = " (no broker user)" if users is not None and row.name not in users else ""
        added = row.created_at.isoformat(timespec="seconds")
        typer.echo(
            f"{row.name:30}  {row.limits.describe()}  added {added} by {row.created_by}{missing}"
        )
    for stray in strays:
        typer.echo(f"{stray:30}  on the broker only: not registered, its submissions are refused")


@tokens_app.command("revoke")
def tokens_revoke(
    name: Name,
    amqp_url: AmqpUrl = "",
    management_url: ManagementUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Delete a submitter token: its broker user (its connections are closed at once) and its
    registration."""
    from .tokens import revoke_submitter

    _need_broker(amqp_url)
    _need_database(database_url)
    try:
        deleted = revoke_submitter(amqp_url, management_url, name)
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc), 1) from None
    actor = operator()
    registered = with_store(
        database_url,
        database_schema,
        lambda s: s.submitters.remove(actor, name, deleted),
        upgrade=True,
    )
    if not deleted and not registered:
        raise _fail(f"no submitter token {name!r}", 1)
    typer.echo(f"submitter token {name} revoked: its connections are cut and its secret refused")
