"""``dispatcher web`` (the HTTP API) and ``dispatcher api-tokens`` (who may call it)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from transport.process import LogLevel

from .cli_common import (
    KNOWN_ERRORS,
    AmqpUrl,
    DatabaseSchema,
    DatabaseUrl,
    LimitLocations,
    LimitQueues,
    _fail,
    limits_of,
    open_database,
    operator,
    with_store,
)

api_tokens_app = typer.Typer(
    help="Tokens of the HTTP API (hdw_..., scopes read < operate < admin), kept hashed in "
    "PostgreSQL. Not the broker's submitter tokens (`dispatcher tokens`).",
    no_args_is_help=True,
)


def web(
    amqp_url: AmqpUrl = "",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
    host: Annotated[
        str, typer.Option(envvar="HD_WEB_HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="HD_WEB_PORT", help="Port to listen on (0: any free one).")
    ] = 8080,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="What to log, from DEBUG up.")
    ] = LogLevel.INFO,
) -> None:
    """Serve the HTTP API under /api/v1 (OpenAPI at /api/v1/openapi.json): runs, agents,
    locations, alerts, limits and live events, behind API tokens (`dispatcher api-tokens`).

    It reads PostgreSQL and sends submissions and cancels through the broker, as any client."""
    from transport.process import run_until_signalled, setup_logging

    open_database()
    from .service import web_server
    from .settings import WebSettings

    try:
        serve_web = web_server()
        settings = WebSettings.from_env(
            amqp_url=amqp_url or None,
            database_url=database_url or None,
            database_schema=database_schema,
            host=host,
            port=port,
        )
        setup_logging(log_level)
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc)) from None
    try:
        run_until_signalled(lambda stop: serve_web(settings, stop))
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc), 1) from None


@api_tokens_app.command("add")
def api_tokens_add(
    name: Annotated[str, typer.Argument(help="Who or what uses it (recorded on its runs).")],
    scope: Annotated[
        str,
        typer.Option(help="read (look), operate (also submit and cancel), admin (everything)."),
    ] = "read",
    queue: LimitQueues = None,
    location: LimitLocations = None,
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Make a token and print it, once: only its hash is kept. Limited by --queue or
    --location, it submits, cancels and reads runs only there, whatever its scope."""
    who = operator()
    limits = limits_of(queue, location)
    token = with_store(
        database_url,
        database_schema,
        lambda s: s.api_tokens.add(name, scope, who, limits),
        upgrade=True,
    )
    typer.echo(token)
    typer.echo(f"API token {name} ({scope}; {limits.describe()}): shown once", err=True)


@api_tokens_app.command("revoke")
def api_tokens_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Revoke a token: the next request with it is refused."""
    who = operator()
    if not with_store(database_url, database_schema, lambda s: s.api_tokens.revoke(name, who)):
        raise _fail(f"no live API token {name!r} (see `dispatcher api-tokens list`)")
    typer.echo(f"API token {name} revoked")


@api_tokens_app.command("list")
def api_tokens_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Every API token: scope, limits, who made it, when it was last used, whether it is
    revoked."""
    tokens = with_store(database_url, database_schema, lambda s: s.api_tokens.list())
    rows = [
        {
            "name": t.name,
            "scope": t.scope,
            "queues": list(t.limits.queues),
            "locations": list(t.limits.locations),
            "created_by": t.created_by,
            "created_at": t.created_at.isoformat(),
            "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
            "revoked": t.revoked_at is not None,
        }
        for t in tokens
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for t, r in zip(tokens, rows, strict=True):
        state = "revoked" if r["revoked"] else f"last used {r['last_used_at'] or 'never'}"
        limits = t.limits.describe()
        typer.echo(f"{r['name']:30}  {r['scope']:8}  {limits}  by {r['created_by']}  {state}")
