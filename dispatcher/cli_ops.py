"""Operators' commands: agents, alerts and dead letters."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Annotated, Any

import typer

from .cli_common import KNOWN_ERRORS, AmqpUrl, DatabaseSchema, DatabaseUrl, _fail, with_store

agents_app = typer.Typer(help="Agents and their liveness (reads PostgreSQL).", no_args_is_help=True)
alerts_app = typer.Typer(help="Alerts and their delivery (reads PostgreSQL).", no_args_is_help=True)
audit_app = typer.Typer(
    help="Who changed locations, identities and tokens, and when (reads PostgreSQL).",
    no_args_is_help=True,
)
dead_letters_app = typer.Typer(
    help="Messages a consumer could not take, with the reason (reads the broker).",
    no_args_is_help=True,
)

AsJson = Annotated[bool, typer.Option("--json", help="One JSON array.")]


def _json_default(value: object) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _run(coroutine: Any) -> Any:
    try:
        return asyncio.run(coroutine)
    except KNOWN_ERRORS as exc:
        raise _fail(str(exc), 1) from None


@agents_app.command("list")
def agents_list(
    as_json: AsJson = False,
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Every agent heard of: status (ALIVE, DRAINING, LOST, LEFT), silence, runs in flight,
    declared capacity ("-": not counted) and queues."""

    agents = with_store(database_url, database_schema, lambda s: s.agents.all())
    if as_json:
        typer.echo(json.dumps(agents, indent=2, default=_json_default))
        return
    typer.echo(
        f"{'AGENT':30}  {'STATUS':8}  {'SILENT':>8}  {'RUNS':>4}  {'CPUS':>5}  {'MEM MB':>7}  "
        f"{'GPUS':>4}  QUEUES"
    )
    for agent in agents:
        cpus = "-" if agent["cpus"] is None else f"{agent['cpus']:g}"
        memory = "-" if agent["memory_mb"] is None else str(agent["memory_mb"])
        typer.echo(
            f"{agent['agent_id']:30}  {agent['status']:8}  {agent['silent_s']:7.1f}s  "
            f"{len(agent['in_flight']):>4}  {cpus:>5}  {memory:>7}  {agent['gpus']:>4}  "
            f"{', '.join(agent['queues'])}"
        )


@alerts_app.command("list")
def alerts_list(
    limit: Annotated[
        int, typer.Option(min=1, max=100_000, help="At most this many, newest first.")
    ] = 50,
    as_json: AsJson = False,
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Alerts, newest first, with the delivery state of each webhook."""

    alerts = with_store(database_url, database_schema, lambda s: s.alerts.recent(limit))
    if as_json:
        typer.echo(json.dumps(alerts, indent=2, default=_json_default))
        return
    for alert in alerts:
        created = alert["created_at"].isoformat(timespec="seconds")
        typer.echo(f"#{alert['id']}  {created}  {alert['kind']:16}  {alert['message']}")
        for delivery in alert["deliveries"]:
            state = "delivered" if delivery["delivered_at"] else "pending"
            error = f" ({delivery['last_error']})" if delivery["last_error"] else ""
            typer.echo(
                f"      {state} to {delivery['url']} after {delivery['attempts']} try(s){error}"
            )


@dead_letters_app.command("list")
def dead_letters_list(
    limit: Annotated[
        int, typer.Option(min=1, max=100_000, help="Show at most this many, oldest first.")
    ] = 20,
    as_json: AsJson = False,
    amqp_url: AmqpUrl = "",
) -> None:
    """Dead letters with the queue they came from and why; they stay in the queue."""
    from transport.connection import connect
    from transport.dead_letters import DeadLetter, peek_dead_letters

    if not amqp_url:
        raise _fail("no broker: pass --amqp-url or set HD_AMQP_URL")

    async def go() -> list[DeadLetter]:
        connection = await connect(amqp_url, "dispatcher-cli")
        try:
            return await peek_dead_letters(connection, limit)
        finally:
            await connection.close()

    letters = _run(go())
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "source_queue": letter.source_queue,
                        "reason": letter.reason,
                        "message_id": letter.message_id,
                        "body": letter.body.decode("utf-8", errors="replace"),
                    }
                    for letter in letters
                ],
                indent=2,
            )
        )
        return
    if not letters:
        typer.echo("no dead letters")
    for letter in letters:
        body = letter.body[:120].decode("utf-8", errors="replace")
        typer.echo(f"from {letter.source_queue}: {letter.reason}\n    {body!r}")


@audit_app.command("list")
def audit_list(
    limit: Annotated[
        int, typer.Option(min=1, max=100_000, help="At most this many, newest first.")
    ] = 50,
    as_json: AsJson = False,
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Operator actions, newest first: who, when, what, on which location or agent."""
    entries = with_store(database_url, database_schema, lambda s: s.audit.recent(limit))
    if as_json:
        typer.echo(json.dumps(entries, indent=2, default=_json_default))
        return
    for entry in entries:
        at = entry["at"].isoformat(timespec="seconds")
        typer.echo(f"{at}  {entry['actor']:30}  {entry['action']:18}  {entry['subject']}")
