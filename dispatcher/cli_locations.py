"""``dispatcher locations``: register the code locations agents keep code servers for."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from .cli_common import (
    DatabaseSchema,
    DatabaseUrl,
    _fail,
    operator,
    parse_env,
    printable,
    with_store,
)

if TYPE_CHECKING:
    from .store import Database, Location

T = TypeVar("T")

locations_app = typer.Typer(
    help="Code locations: an image with jobs, kept running as a code server by agents.",
    no_args_is_help=True,
)

Name = Annotated[
    str, typer.Argument(help="The location's name: 1 to 63 lowercase letters, digits, _ and -.")
]


def _with_store(
    database_url: str, database_schema: str | None, action: Callable[[Database], Awaitable[T]]
) -> T:
    # The registry's table may not exist before the first `serve`: migrate first.
    return with_store(database_url, database_schema, action, upgrade=True)


def _show(location: Location) -> None:
    typer.echo(
        f"{location.name}: {location.status} (generation {location.generation}), "
        f"image {location.image}, queue {location.queue}"
    )


Image = Annotated[str, typer.Option(help="The location's image (on the agents' hosts).")]
Command = Annotated[
    list[str] | None, typer.Option("--command", help="Code-server command word; repeatable.")
]
Env = Annotated[
    list[str] | None,
    typer.Option("--env", "-e", help="KEY=VALUE or KEY=secret:NAME (resolved on the agent)."),
]
Queue = Annotated[str, typer.Option(help="Agent queue whose agents keep the code server.")]
KEPT = " Not given: as it is."
NewImage = Annotated[str | None, typer.Option("--image", help=f"The location's image.{KEPT}")]
NewCommand = Annotated[
    list[str] | None,
    typer.Option("--command", help=f"Code-server command word; repeatable.{KEPT}"),
]
NewEnv = Annotated[
    list[str] | None,
    typer.Option(
        "--env", "-e", help=f"KEY=VALUE or KEY=secret:NAME; repeatable; all of them.{KEPT}"
    ),
]
NewQueue = Annotated[
    str | None, typer.Option("--queue", help=f"Agent queue of its code servers.{KEPT}")
]
NoCommand = Annotated[
    bool, typer.Option("--no-command", help="Clear the command: the image's own runs.")
]
NoEnv = Annotated[bool, typer.Option("--no-env", help="Clear every variable.")]


def _put(
    create: bool,
    name: str,
    image: str | None,
    command: list[str] | None,
    env: list[str] | None,
    queue: str | None,
    database_url: str,
    database_schema: str | None,
) -> None:
    """Add a location, or update one: an update keeps what is not given (None) as it is."""
    variables = parse_env(env, "KEY=VALUE (or KEY=secret:NAME)") if env is not None else None
    if create:
        command, variables = command or [], variables or {}
    _show(
        _with_store(
            database_url,
            database_schema,
            lambda s: s.locations.put(
                name, image, command, variables, queue, create=create, actor=operator()
            ),
        )
    )


@locations_app.command("add")
def add(
    name: Name,
    image: Image = "",
    command: Command = None,
    env: Env = None,
    queue: Queue = "default",
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Register a location; the agents of its queue start its code server."""
    _put(True, name, image, command, env, queue, database_url, database_schema)


@locations_app.command("update")
def update(
    name: Name,
    image: NewImage = None,
    command: NewCommand = None,
    env: NewEnv = None,
    queue: NewQueue = None,
    no_command: NoCommand = False,
    no_env: NoEnv = False,
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Change a location (a new generation: servers are replaced, blue/green). What is not
    given stays as it is; `--env` replaces all of the location's variables."""
    for cleared, given, what in ((no_command, command, "command"), (no_env, env, "env")):
        if cleared and given:
            raise _fail(f"give --{what} or --no-{what}, not both")
    command = [] if no_command else command
    env = [] if no_env else env
    _put(False, name, image, command, env, queue, database_url, database_schema)


@locations_app.command("redeploy")
def redeploy(
    name: Name, database_url: DatabaseUrl = "", database_schema: DatabaseSchema = None
) -> None:
    """Start fresh code servers for a location, as it is."""
    _show(
        _with_store(database_url, database_schema, lambda s: s.locations.redeploy(name, operator()))
    )


@locations_app.command("remove")
def remove(
    name: Name, database_url: DatabaseUrl = "", database_schema: DatabaseSchema = None
) -> None:
    """Remove a location; its code servers are stopped."""
    _with_store(database_url, database_schema, lambda s: s.locations.remove(name, operator()))
    typer.echo(f"{name}: removed")


@locations_app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
    database_url: DatabaseUrl = "",
    database_schema: DatabaseSchema = None,
) -> None:
    """Every location: status (LOADING, LOADED, ERROR), generation, jobs."""
    locations = _with_store(database_url, database_schema, lambda s: s.locations.all())
    if as_json:
        rows: list[dict[str, Any]] = [
            {
                "name": loc.name,
                "image": loc.image,
                "queue": loc.queue,
                "status": loc.status,
                "generation": loc.generation,
                "jobs": loc.jobs,
                "error": loc.error,
                "loaded_at": loc.loaded_at.isoformat() if loc.loaded_at else None,
            }
            for loc in locations
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    for location in locations:
        _show(location)
        for job in location.jobs:
            typer.echo(f"    job {job['name']}: {printable(str(job.get('description', '')))}")
        if location.error:
            typer.echo(f"    error: {printable(location.error.splitlines()[0])}")
