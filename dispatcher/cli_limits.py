"""``dispatcher limits``: concurrency limits on runs (writes PostgreSQL)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from .cli_common import DatabaseSchema, DatabaseUrl, _fail, operator, with_store
from .errors import BadLimit
from .limits import Limit, parse

if TYPE_CHECKING:
    pass

limits_app = typer.Typer(
    help="Concurrency limits: how many runs of a kind may hold a slot at once. A run under a "
    "full limit waits QUEUED (no instruction sent) until every limit it falls under has room; "
    "among waiting runs, higher --priority starts first.",
    no_args_is_help=True,
)

LimitKey = Annotated[
    str,
    typer.Argument(
        help="global, queue:NAME, location:NAME or tag:KEY=VALUE (runs submitted with "
        "--tag KEY=VALUE)."
    ),
]


def _checked(key: str, max_running: int = 0) -> Limit:
    try:
        return parse(key, max_running)
    except BadLimit as exc:
        raise _fail(str(exc)) from None


@limits_app.command("set")
def limits_set(
    key: LimitKey,
    limit: Annotated[int, typer.Argument(help="Runs at most at once (0 holds every run).")],
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Set (or change) a limit. Runs already going keep going; a lower limit holds new ones."""
    _checked(key, limit)
    who = operator()
    set_limit = with_store(
        database_url, database_schema, lambda s: s.limits.set(key, limit, who), upgrade=True
    )
    typer.echo(f"limit {set_limit.key}: at most {set_limit.max_running} run(s) at once")


@limits_app.command("remove")
def limits_remove(
    key: LimitKey,
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Remove a limit; the runs it held start (if no other limit holds them)."""
    # By its key as listed, unparsed: a limit set before names were checked goes too
    # (a key `limits set` writes is already as it lists it).
    key = key.strip()
    who = operator()
    if not with_store(database_url, database_schema, lambda s: s.limits.remove(key, who)):
        raise _fail(f"no limit {key!r} (see `dispatcher limits list`)")
    typer.echo(f"limit {key} removed")


@limits_app.command("list")
def limits_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Every limit: its size, the runs holding its slots and the runs it holds back."""
    usages = with_store(database_url, database_schema, lambda s: s.limits.usage())
    rows = [
        {
            "key": u.limit.key,
            "max_running": u.limit.max_running,
            "running": u.running,
            "waiting": u.waiting,
        }
        for u in usages
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no limits (every run goes to its queue at once)")
        return
    width = max(len("LIMIT"), *(len(str(r["key"])) for r in rows))
    typer.echo(f"{'LIMIT':{width}}  {'MAX':>5}  {'RUNNING':>7}  {'WAITING':>7}")
    for r in rows:
        typer.echo(
            f"{r['key']!s:{width}}  {r['max_running']:>5}  {r['running']:>7}  {r['waiting']:>7}"
        )
